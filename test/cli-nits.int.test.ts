import { spawn } from 'node:child_process'
import { readFile } from 'node:fs/promises'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { CONFIG_VARIABLES } from '../infra/config.ts'
import { cliPath, natsAdmin, repoRoot, runCli, testEnv } from './fixtures.ts'
import {
  freshDatabase,
  startNatsServer,
  startRoleNatsServer,
  type NatsServer,
  type RoleNatsServer,
} from './harness/test-servers.ts'

describe('the CLI says what is wrong, the same way everywhere', () => {
  let nats: NatsServer
  let env: Record<string, string>
  beforeAll(async () => {
    nats = await startNatsServer()
    env = testEnv(nats.url, await freshDatabase())
    const setup = await runCli(['setup'], env)
    expect(setup.code, setup.output).toBe(0)
  })
  afterAll(async () => nats.cleanup())

  it('a whole number given a fraction is bad usage (exit 2) naming option and value, before any query', async () => {
    const alerts = await runCli(['alerts', 'list', '--limit', '1.5'], env)
    expect(alerts.code, alerts.output).toBe(2)
    expect(alerts.output).toContain("option '--limit <n>' argument '1.5' is invalid")
    expect(alerts.output).toContain("must be an integer >= 1, got '1.5'")
    expect(alerts.output).not.toMatch(/22P02|invalid input syntax/)

    const simulate = await runCli(['simulate', '--devices', '1.5', '--duration', '1'], env)
    expect(simulate.code, simulate.output).toBe(2)
    expect(simulate.output).toContain("option '--devices <n>' argument '1.5' is invalid")
    expect(simulate.output).not.toMatch(/^sent /m)
  })

  it('"not found" exits 2 for events show as for dlq show', async () => {
    const event = await runCli(['events', 'show', '999'], env)
    expect(event.code, event.output).toBe(2)
    expect(event.output).toContain('no event at sequence 999 in FLEET_EVENTS')
    const dlq = await runCli(['dlq', 'show', '999'], env)
    expect(dlq.code, dlq.output).toBe(2)
    expect(dlq.output).toContain("'seq' must be the sequence of an entry in FLEET_DLQ, got 999")
  })

  it('stops quietly when the reader of its output has gone (`fleetstream --help | head`)', async () => {
    const child = spawn(process.execPath, [cliPath, '--help'], {
      env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '/tmp' },
      stdio: ['ignore', 'pipe', 'pipe'],
    })
    child.stdout.destroy() // gone before the CLI has loaded, so its first write finds no reader
    let stderr = ''
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()))
    const code = await new Promise<number | null>((resolve) => child.on('exit', resolve))
    expect(stderr).toBe('')
    expect(code).toBe(0)
  })

  it('setup --help names all three streams it creates', async () => {
    const r = await runCli(['setup', '--help'], env)
    expect(r.code).toBe(0)
    expect(r.output.replace(/\s+/g, ' ')).toContain(
      'FLEET_EVENTS, FLEET_DLQ and FLEET_NOTIFICATIONS',
    )
  })

  it('the simulator sends status events: one per device, as each reports itself active', async () => {
    const r = await runCli(
      [
        'simulate',
        '--devices',
        '3',
        '--rate',
        '10',
        '--duration',
        '1',
        '--seed',
        '1',
        '--duplicates',
        '0',
      ],
      env,
    )
    expect(r.code, r.output).toBe(0)
    const { nc, jsm } = await natsAdmin(nats.url)
    const info = await jsm.streams.info('FLEET_EVENTS', {
      subjects_filter: 'fleet.events.*.status',
    })
    await nc.close()
    const perDevice = Object.values(info.state.subjects ?? {})
    expect(perDevice).toHaveLength(3)
    expect(perDevice.every((n) => n === 1)).toBe(true)
  })

  it("status against a database that does not exist says so (exit 1), not 'unreachable'", async () => {
    const url = new URL(env.DATABASE_URL ?? '')
    url.pathname = `${url.pathname}_missing`
    const name = url.pathname.slice(1)
    const r = await runCli(['status', '--window', '0', '--timeout', '5'], {
      ...env,
      DATABASE_URL: url.toString(),
    })
    expect(r.code, r.output).toBe(1)
    expect(r.output).toContain(`no database '${name}' at postgres://`)
    expect(r.output).toContain('(run setup first)')
    expect(r.output).not.toMatch(/unreachable|cannot reach/)
  })

  it('README lists every configuration variable, alerts ack --json and how to save the nats context', async () => {
    const readme = await readFile(`${repoRoot}/README.md`, 'utf8')
    const table = readme.split('\n## Configuration\n')[1]?.split('\n## ')[0] ?? ''
    const rows = table.split('\n').filter((l) => l.startsWith('| `'))
    for (const v of CONFIG_VARIABLES) {
      expect(
        rows.some((r) => r.split('|')[1]?.includes(`\`${v}\``)),
        v,
      ).toBe(true)
    }
    expect(readme).toContain('`alerts ack <alert-id> --by <name> [--note <text>] [--json]`')
  })
})

describe('rebuild and replay give up on their set-up after --timeout', () => {
  let ns: RoleNatsServer
  let env: Record<string, string>
  beforeAll(async () => {
    ns = await startRoleNatsServer()
    // The processor role may not create streams: its set-up waits for an admin's `setup`.
    env = { ...testEnv(ns.url, await freshDatabase()), ...ns.env('processor') }
  })
  afterAll(async () => ns.cleanup())

  for (const args of [
    ['rebuild', 'readings'],
    ['replay', 'readings', '--from-seq', '1'],
  ]) {
    it(`${args[0]} with no streams yet exits 1 after --timeout, with the reason`, async () => {
      const r = await runCli([...args, '--timeout', '2'], env, 45_000)
      expect(r.code, r.output).toBe(1)
      expect(r.output).toContain('set-up did not complete within 2 s')
      expect(r.output).toContain(
        'stream FLEET_EVENTS does not exist and this NATS user may not create it',
      )
      // Bounded: an unbounded retry would outlive runCli's 45 s and exit with a signal, not 1.
    })
  }
})
