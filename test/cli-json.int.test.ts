import { spawn } from 'node:child_process'
import { jetstream } from '@nats-io/jetstream'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { createPublisher } from '../infra/publisher.ts'
import { HybridLogicalClock } from '../schemas/hlc.ts'
import { cliPath, readingDraft, repoRoot, rulesFile, testEnv } from './fixtures.ts'
import { freshDatabase, startRoleNatsServer, type RoleNatsServer } from './harness/test-servers.ts'

/** A finished CLI process with stdout apart from stderr: what a script piping `--json` gets. */
interface Captured {
  code: number
  stdout: string
  stderr: string
}

/** Runs `command args` (the CLI by default) and keeps stdout and stderr apart. */
function capture(
  args: readonly string[],
  env: Record<string, string>,
  command: readonly string[] = [process.execPath, cliPath],
): Promise<Captured> {
  const [bin = '', ...pre] = command
  const child = spawn(bin, [...pre, ...args], {
    cwd: repoRoot,
    env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '/tmp', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  let stdout = ''
  let stderr = ''
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()))
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()))
  const timer = setTimeout(() => child.kill('SIGKILL'), 90_000)
  return new Promise((resolve) => {
    child.on('close', (code) => {
      clearTimeout(timer)
      resolve({ code: code ?? 137, stdout, stderr })
    })
  })
}

/** A finite command's `--json`: stdout is exactly one JSON document. */
function oneDocument(r: Captured): unknown {
  expect(r.code, r.stderr).toBe(0)
  return JSON.parse(r.stdout) as unknown
}

/** A following command's `--json`: every line of stdout is one JSON object. */
function jsonLines(r: Captured): Record<string, unknown>[] {
  expect(r.code, r.stderr).toBe(0)
  const lines = r.stdout.split('\n').filter((l) => l !== '')
  expect(lines.length).toBeGreaterThan(0)
  return lines.map((l) => {
    const v = JSON.parse(l) as unknown
    expect(typeof v === 'object' && v !== null && !Array.isArray(v), l).toBe(true)
    return v as Record<string, unknown>
  })
}

describe('--json: one JSON document for a command that ends, JSON lines for one that follows', () => {
  let ns: RoleNatsServer
  let env: Record<string, string>
  beforeAll(async () => {
    ns = await startRoleNatsServer()
    env = {
      ...testEnv(ns.url, await freshDatabase(), { ALERT_RULES_FILE: await rulesFile() }),
      ...ns.env('admin'),
      ...ns.devicesEnv(),
    }
  })
  afterAll(async () => ns.cleanup())

  it('every command, run against the role-scoped server, prints what the rule says', async () => {
    const setup = oneDocument(await capture(['setup', '--json'], env)) as {
      streams: Record<string, string>
    }
    expect(setup.streams.FLEET_EVENTS).toBe('created')

    // Given: an overheating sensor (an alert to list and acknowledge) and an event no processor
    // can decode (a DLQ entry to list, show and redrive).
    const { nc } = await ns.admin()
    const js = jetstream(nc)
    const publisher = createPublisher(js, {
      clock: new HybridLogicalClock({ node: 'test-json', maxOffsetMs: 500 }),
    })
    await publisher.publish({
      type: 'sensor.registered',
      deviceId: 'hot-1',
      data: { site: 'site-001', model: 'fs-th-200', firmware: '1.4.2' },
    })
    await publisher.publish(readingDraft('hot-1', 55))
    await publisher.publish(readingDraft('hot-1', 56))
    await js.publish('fleet.events.broken-1.reading', 'not json')
    await nc.close()

    const simulate = oneDocument(
      await capture(
        ['simulate', '--devices', '2', '--rate', '20', '--duration', '1', '--seed', '1', '--json'],
        env,
      ),
    ) as { sent: number }
    expect(simulate.sent).toBeGreaterThan(0)

    // start follows: JSON lines, the first 'started', the last 'finished'.
    const start = jsonLines(
      await capture(
        ['start', '--devices', '2', '--rate', '20', '--duration', '2', '--seed', '2', '--json'],
        env,
      ),
    )
    expect(start[0]?.type).toBe('started')
    expect(start.at(-1)?.type).toBe('finished')
    expect(start.filter((l) => l.type === 'finished')).toHaveLength(1)
    expect(JSON.stringify(start)).not.toContain(env.NATS_PASSWORD ?? '?')

    const status = oneDocument(await capture(['status', '--window', '0', '--json'], env)) as {
      processors: unknown[]
    }
    expect(status.processors).toHaveLength(3)

    const alerts = oneDocument(await capture(['alerts', 'list', '--json'], env)) as {
      alert_id: string
      state: string
    }[]
    expect(Array.isArray(alerts)).toBe(true)
    const open = alerts.find((a) => a.state === 'open')
    expect(open, JSON.stringify(alerts)).toBeDefined()
    const ack = oneDocument(
      await capture(['alerts', 'ack', open?.alert_id ?? '', '--by', 'test', '--json'], env),
    ) as { alertId: string; seq: number }
    expect(ack.alertId).toBe(open?.alert_id)

    const dlq = oneDocument(await capture(['dlq', 'list', '--json'], env)) as { seq: number }[]
    expect(Array.isArray(dlq)).toBe(true)
    const parked = dlq[0]
    expect(parked, 'a parked event').toBeDefined()
    const shown = oneDocument(
      await capture(['dlq', 'show', String(parked?.seq), '--json'], env),
    ) as { seq: number }
    expect(shown.seq).toBe(parked?.seq)

    const event = oneDocument(await capture(['events', 'show', '1', '--json'], env)) as {
      seq: number
    }
    expect(event.seq).toBe(1)
    // events tail follows: JSON lines, also when --limit ends it.
    const tail = jsonLines(
      await capture(['events', 'tail', '--from-seq', '1', '--limit', '3', '--json'], env),
    )
    expect(tail.map((e) => e.seq)).toEqual([1, 2, 3])

    const rebuild = oneDocument(await capture(['rebuild', 'readings', '--json'], env)) as {
      applied: number
    }
    expect(rebuild.applied).toBeGreaterThan(0)
    const replay = oneDocument(
      await capture(['replay', 'readings', '--from-seq', '1', '--no-wait', '--json'], env),
    )
    expect(typeof replay).toBe('object')

    const redriven = oneDocument(
      await capture(['dlq', 'redrive', '--seq', String(parked?.seq), '--json'], env),
    ) as { seq: number }[]
    expect(redriven.map((e) => e.seq)).toEqual([parked?.seq])

    const added = oneDocument(await capture(['devices', 'add', 'json-1', '--json'], env)) as {
      deviceId: string
    }
    expect(added.deviceId).toBe('json-1')
    const devices = oneDocument(await capture(['devices', 'list', '--json'], env)) as {
      deviceId: string
    }[]
    expect(devices.map((d) => d.deviceId)).toContain('json-1')
    const revoked = oneDocument(await capture(['devices', 'revoke', 'json-1', '--json'], env)) as {
      revoked: boolean
    }
    expect(revoked.revoked).toBe(true)
  }, 240_000)

  it("the README's way to run the CLI, npm run -s, leaves stdout to the command", async () => {
    const r = await capture(['run', '-s', 'fleetstream', '--', 'alerts', 'list', '--json'], env, [
      'npm',
    ])
    expect(Array.isArray(oneDocument(r))).toBe(true)
  })

  it('every --json help states the rule', async () => {
    const help = await capture(['--help'], env)
    expect(help.stdout).toContain('a command that ends prints one JSON document on stdout')
    for (const cmd of [
      ['alerts', 'list'],
      ['dlq', 'list'],
      ['devices', 'list'],
    ]) {
      const r = await capture([...cmd, '--help'], env)
      expect(r.stdout.replace(/\s+/g, ' ')).toMatch(
        /--json print the \w+ as one JSON document on stdout: an array/,
      )
    }
    for (const cmd of [['events', 'tail'], ['start']]) {
      const r = await capture([...cmd, '--help'], env)
      expect(r.stdout.replace(/\s+/g, ' ')).toContain('on stdout, one per line (JSON lines)')
    }
  })
})
