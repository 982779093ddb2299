import { headers } from '@nats-io/transport-node'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Runtime } from '../app/runtime.ts'
import { PROCESSOR_NAMES } from '../processors/processor-registry.ts'
import { scratchSchemaName } from '../processors/admin/blue-green.ts'
import { simulateFleet } from '../simulator/fleet.ts'
import type { NatsServer } from './harness/test-servers.ts'
import {
  allCaughtUp,
  cliSystem,
  dumpReadModels,
  runCli,
  spawnCli,
  testPublisher,
  waitFor,
  type CliProcess,
} from './fixtures.ts'

/** The JSON line a `--json` command printed (its progress goes to stderr, in the same capture). */
function jsonLine(output: string): Record<string, unknown> {
  const line = output.split('\n').find((l) => l.startsWith('{'))
  if (line === undefined) throw new Error(`no JSON in the output:\n${output}`)
  return JSON.parse(line) as Record<string, unknown>
}

/** Garbage a device could send: every processor reads the subject, and every one parks it. */
const POISON = ['poison-1', 'poison-2', 'poison-3']

describe('fleetstream rebuild after poison events every processor parked', () => {
  let nats: NatsServer
  let rt: Runtime
  let env: Record<string, string>
  let live: CliProcess
  let client: pg.Client
  const dlqDepth = async () => (await rt.jsm.streams.info(rt.config.streams.dlq)).state.messages

  beforeAll(async () => {
    ;({ nats, env, rt } = await cliSystem())
    client = new pg.Client(rt.config.databaseUrl)
    await client.connect()
    live = spawnCli(['run', '--no-clock'], env)
    await simulateFleet(testPublisher(rt, 'sim'), {
      devices: 20,
      rate: 1500,
      durationSeconds: 2,
      duplicateRatio: 0,
      seed: 7,
    })
    // Interleaved with good events, so that the processors park them in no particular order.
    for (const id of POISON) {
      const h = headers()
      h.set('Fleet-Hlc', '1795000000000-000000-gw')
      await rt.js.publish(`fleet.events.dev-${id}.reading`, '{"not": json', {
        msgID: id,
        headers: h,
      })
      await simulateFleet(testPublisher(rt, `sim-${id}`), {
        devices: 5,
        rate: 500,
        durationSeconds: 0.2,
        duplicateRatio: 0,
        seed: 11,
      })
    }
    await waitFor(
      'each processor to park each poison event',
      async () => (await dlqDepth()) === POISON.length * PROCESSOR_NAMES.length,
      60_000,
      async () => `${await dlqDepth()} entries; ${live.output()}`,
    )
    await allCaughtUp(rt, PROCESSOR_NAMES, 120_000)
  }, 180_000)

  afterAll(async () => {
    live.child.kill('SIGKILL')
    await live.exited
    await client.end()
    await rt.close()
    await nats.cleanup()
  })

  it('rebuilds each projection, skipping what its processor parked, whoever parked the newest entry', async () => {
    // The newest DLQ entry was parked by one processor: the other two read up to it, and past it.
    const before = await dumpReadModels(rt)
    for (const name of PROCESSOR_NAMES) {
      const r = await runCli(['rebuild', name, '--json', '--drop-retired'], env, 90_000)
      expect(r.code, `${name}: ${r.output}`).toBe(0)
      const result = jsonLine(r.output)
      expect(result).toMatchObject({ processor: name })
      expect(result.skipped as number).toBeGreaterThanOrEqual(POISON.length)
    }
    expect(await dumpReadModels(rt)).toEqual(before)
    expect(await dlqDepth()).toBe(POISON.length * PROCESSOR_NAMES.length)
  }, 300_000)

  it('swaps although the live outbox is never free for 500 ms (busy live transactions, as on a loaded machine)', async () => {
    // Three overlapping transactions, each holding notification_outbox for 3 s, a second apart: at
    // any moment one of them holds it for 2 s more, as the live batches and the outbox relay did
    // under load. The swap must get the tables all the same (the live processor waits behind it).
    const holding = { on: true }
    const holders = [0, 1000, 2000].map(async (offset) => {
      const c = new pg.Client(rt.config.databaseUrl)
      await c.connect()
      await new Promise((r) => setTimeout(r, offset))
      try {
        while (holding.on) {
          await c.query('begin')
          await c.query('lock table notification_outbox in row exclusive mode')
          await new Promise((r) => setTimeout(r, 3000))
          await c.query('commit')
        }
      } finally {
        await c.end()
      }
    })
    try {
      const r = await runCli(['rebuild', 'alerts', '--json', '--drop-retired'], env, 90_000)
      expect(r.code, r.output).toBe(0)
      const result = jsonLine(r.output)
      expect(result).toMatchObject({ processor: 'alerts' })
      expect(result.deferredSwaps as number).toBeGreaterThan(0)
    } finally {
      holding.on = false
      await Promise.all(holders)
    }
  }, 180_000)

  it('a SIGINT stops a rebuild mid-way: exit 130 within seconds, the live tables untouched', async () => {
    const before = await dumpReadModels(rt)
    const scratchAt = async () =>
      (
        await client
          .query<{ n: number }>(
            `select last_seq::int as n from ${scratchSchemaName('readings')}.processor_checkpoints where processor = 'readings'`,
          )
          .catch(() => ({ rows: [] as { n: number }[] }))
      ).rows[0]?.n ?? 0
    // A long report holds the live table, so the rebuild cannot swap: it is mid-way until stopped.
    const report = new pg.Client(rt.config.databaseUrl)
    await report.connect()
    try {
      await report.query('begin')
      await report.query('lock table readings in access share mode')
      const rebuild = spawnCli(['rebuild', 'readings', '--batch-size', '20'], env)
      await waitFor(
        'the rebuild to get going',
        async () => (await scratchAt()) > 200,
        60_000,
        () => rebuild.output(),
      )
      rebuild.child.kill('SIGINT')
      const signalled = Date.now()
      const code = await rebuild.exited
      const took = Date.now() - signalled
      expect(code, rebuild.output()).toBe(130)
      expect(rebuild.output()).toContain("rebuild of 'readings' interrupted")
      expect(rebuild.output()).not.toMatch(/rebuilt readings/)
      // Generous for a loaded machine; the first signal is enough (a second would exit at once).
      expect(took).toBeLessThan(10_000)
    } finally {
      await report.query('rollback')
      await report.end()
    }
    expect(await dumpReadModels(rt)).toEqual(before)
    const retired = await client.query(
      "select 1 from pg_namespace where nspname like 'retired_readings%'",
    )
    expect(retired.rowCount).toBe(0)
  }, 120_000)
})
