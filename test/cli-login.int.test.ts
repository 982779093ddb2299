import { jetstream } from '@nats-io/jetstream'
import type { NatsConnection } from '@nats-io/transport-node'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { ShownEvent } from '../cli/stored-events.ts'
import type { StatusReport } from '../cli/fleet-status.ts'
import { createPublisher } from '../infra/publisher.ts'
import { HybridLogicalClock } from '../schemas/hlc.ts'
import { freshDatabase, startRoleNatsServer, type RoleNatsServer } from './harness/test-servers.ts'
import { readingDraft, rulesFile, runCli, testEnv } from './fixtures.ts'

/**
 * Every CLI command that talks to NATS logs in with NATS_USER, NATS_PASSWORD and
 * NATS_INBOX_PREFIX, against nats-server started with the repository's own nats.conf (which
 * refuses anonymous clients and confines each role's replies to its inbox prefix).
 */
describe('CLI commands log in to a role-scoped NATS', () => {
  let ns: RoleNatsServer
  let env: Record<string, string>
  let device: NatsConnection
  const as = (role: 'admin' | 'processor') => ({ ...env, ...ns.env(role) })

  beforeAll(async () => {
    ns = await startRoleNatsServer()
    env = testEnv(ns.url, await freshDatabase(), { ALERT_RULES_FILE: await rulesFile() })
    const setup = await runCli(['setup'], as('admin'))
    expect(setup.code, setup.output).toBe(0)
    device = await ns.connect('gateway')
    const publisher = createPublisher(jetstream(device), {
      clock: new HybridLogicalClock({ node: 'gw-login', maxOffsetMs: 500 }),
    })
    for (let i = 0; i < 3; i++) await publisher.publish(readingDraft('login-1', 20 + i))
  })
  afterAll(async () => {
    await device.close()
    await ns.cleanup()
  })

  it('status: reports the stream as the admin and as the processor role, exit 0', async () => {
    for (const role of ['admin', 'processor'] as const) {
      const r = await runCli(['status', '--json', '--window', '0', '--timeout', '10'], as(role))
      expect(r.code, `${role}: ${r.output}`).toBe(0)
      const report = JSON.parse(r.output.split('\n')[0]!) as StatusReport
      expect(report.stream).toMatchObject({ name: 'FLEET_EVENTS', messages: 3, lastSeq: 3 })
      expect(report.processors.map((p) => p.name).sort()).toEqual([
        'alerts',
        'readings',
        'sensor-status',
      ])
    }
  })

  it('status: a wrong password is a configuration error naming the user, exit 2', async () => {
    const r = await runCli(['status', '--window', '0', '--timeout', '5'], {
      ...as('admin'),
      NATS_PASSWORD: 'wrong-password-42',
    })
    expect(r.code, r.output).toBe(2)
    expect(r.output).toContain(`'NATS_USER' 'admin' with 'NATS_PASSWORD' was refused by NATS at`)
    expect(r.output).not.toContain('wrong-password-42')
  })

  it('events tail and events show: read the stream as the admin, exit 0', async () => {
    const tail = await runCli(
      ['events', 'tail', '--last', '3', '--limit', '3', '--json'],
      as('admin'),
      30_000,
    )
    expect(tail.code, tail.output).toBe(0)
    const shown = tail.output
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as ShownEvent)
    expect(shown.map((e) => e.seq)).toEqual([1, 2, 3])
    expect(shown.every((e) => e.ok && e.event.deviceId === 'login-1')).toBe(true)

    const show = await runCli(['events', 'show', '2', '--json'], as('admin'), 30_000)
    expect(show.code, show.output).toBe(0)
    expect((JSON.parse(show.output) as ShownEvent).seq).toBe(2)
  })

  it('dlq list and alerts list: work as the admin, exit 0', async () => {
    const dlq = await runCli(['dlq', 'list', '--json'], as('admin'))
    expect(dlq.code, dlq.output).toBe(0)
    expect(JSON.parse(dlq.output)).toEqual([])
    const alerts = await runCli(['alerts', 'list', '--json'], as('admin'))
    expect(alerts.code, alerts.output).toBe(0)
  })
})
