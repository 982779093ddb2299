/**
 * Every command's exit code follows from the kind of error it throws (schemas/errors.ts,
 * cli/exit-codes.ts): one usage error per command exits 2 and names the problem, and a dependency
 * that stays away exits 1 with the message alone. Each usage error is caught before any connection is made, so no server runs:
 * the URLs point at a port nobody listens on.
 */
import { describe, expect, it } from 'vitest'
import { runCli } from './fixtures.ts'

const env = {
  NATS_URL: 'nats://127.0.0.1:1',
  DATABASE_URL: 'postgres://postgres@127.0.0.1:1/fleetstream',
  LOG_LEVEL: 'warn',
  METRICS_PORT: 'off',
}

/** A command line with a usage error, and what the message must say. */
const USAGE_ERRORS: readonly (readonly [readonly string[], string])[] = [
  [['setup', '--timeout', '0'], "argument '0' is invalid. must be a number > 0, got '0'"],
  [['run', 'bogus'], "'processor' must be one of sensor-status, readings, alerts, got 'bogus'"],
  [['clock', 'now'], "too many arguments for 'clock'"],
  [['status', '--max-lag', '-1'], "must be an integer >= 0, got '-1'"],
  [['rebuild', 'nope'], "must be one of sensor-status, readings, alerts, got 'nope'"],
  [['replay', 'readings'], "give exactly one of '--from-seq <n>' and '--since <time>'"],
  [['dlq', 'list', '--processor', 'nope'], "argument 'nope' is invalid. Allowed choices are"],
  [['dlq', 'show', '0'], "must be an integer >= 1, got '0'"],
  [['dlq', 'redrive'], "give exactly one of '--seq <n...>' and '--all'"],
  [
    ['events', 'tail', '--since', 'yesterday'],
    "or a duration ago (e.g. 90s, 15m, 2h, 1d), got 'yesterday'",
  ],
  [['events', 'show'], "missing required argument 'seq'"],
  [['devices', 'add', 'Sensor 7'], "'deviceId' must match /^[a-z0-9-]{1,64}$/, got 'Sensor 7'"],
  [['devices', 'revoke'], "missing required argument 'deviceId'"],
  [['devices', 'list', '--bogus'], "unknown option '--bogus'"],
  [['alerts', 'list', '--limit', '1.5'], "must be an integer >= 1, got '1.5'"],
  [['alerts', 'ack', 'a-1'], "required option '--by <name>' not specified"],
  [['simulate', '--duplicates', '2'], "must be a number in [0, 1], got '2'"],
  [['start', '--rate', '0'], "must be a number > 0, got '0'"],
]

describe('exit codes follow from the error class', () => {
  it.concurrent.each(USAGE_ERRORS)(
    '%j is bad usage: exit 2 naming the problem',
    async (args, message) => {
      const r = await runCli(args, env)
      expect(r.code, r.output).toBe(2)
      expect(r.output).toContain(`fleetstream: `)
      expect(r.output).toContain(message)
    },
  )

  it('bad configuration exits 2 with every problem listed, before connecting', async () => {
    const r = await runCli(['run'], { ...env, LOG_LEVEL: 'loud' })
    expect(r.code, r.output).toBe(2)
    expect(r.output).toContain("invalid configuration: 'LOG_LEVEL' must be one of")
  })

  it('a dependency that stays away past --timeout exits 1 with the message alone', async () => {
    const r = await runCli(['events', 'show', '1', '--timeout', '0.5'], env)
    expect(r.code, r.output).toBe(1)
    expect(r.output).toMatch(
      /^fleetstream: cannot reach NATS at nats:\/\/127\.0\.0\.1:1 within 0\.5 s: /m,
    )
  })
})
