import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { jetstream, jetstreamManager } from '@nats-io/jetstream'
import { connect, type NatsConnection } from '@nats-io/transport-node'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { isPermissionViolation } from '../infra/failures.ts'
import { createPublisher } from '../infra/publisher.ts'
import { PROCESSOR_NAMES } from '../processors/processor-registry.ts'
import { HybridLogicalClock } from '../schemas/hlc.ts'
import { freshDatabase, startRoleNatsServer, type RoleNatsServer } from './harness/test-servers.ts'
import {
  readingDraft,
  rulesFile,
  runCli,
  spawnCli,
  testEnv,
  waitFor,
  type CliProcess,
} from './fixtures.ts'

/** Resolves with the error the promise rejects with; fails the test if it resolves. */
async function rejection(p: Promise<unknown>): Promise<unknown> {
  try {
    await p
  } catch (err) {
    return err
  }
  throw new Error('expected a refusal, but it was allowed')
}

/** The server refused this request or publish for the user's role. */
async function expectRefused(p: Promise<unknown>): Promise<void> {
  const err = await rejection(p)
  expect(isPermissionViolation(err), String(err)).toBe(true)
}

/** The server refused a subscription: nats.js closes it with the permission error. */
async function expectSubscriptionRefused(nc: NatsConnection, subject: string): Promise<void> {
  const sub = nc.subscribe(subject)
  await nc.flush()
  const closed = await Promise.race([
    sub.closed,
    new Promise((r) => setTimeout(r, 5000, 'still open')),
  ])
  expect(isPermissionViolation(closed), `subscription to ${subject}: ${String(closed)}`).toBe(true)
}

/**
 * nats-server started with the repository's own nats.conf: each role can do what its commands
 * need, and is refused what it must not do.
 */
describe('NATS roles from nats.conf', () => {
  let ns: RoleNatsServer
  let dbUrl: string
  let env: Record<string, string>
  let db: pg.Client
  /** A gateway: speaks for many devices (the simulator's role). */
  let gateway: NatsConnection
  /** A device with a credential of its own (`fleetstream devices add kind-1`). */
  let device: NatsConnection
  let processor: NatsConnection
  let admin: NatsConnection
  const procs: CliProcess[] = []

  beforeAll(async () => {
    ns = await startRoleNatsServer()
    dbUrl = await freshDatabase()
    env = testEnv(ns.url, dbUrl, { ALERT_RULES_FILE: await rulesFile(), CLOCK_TICK_SECONDS: '1' })
    db = new pg.Client(dbUrl)
    await db.connect()
    gateway = await ns.connect('gateway')
    device = await ns.connectDevice(await ns.addDevice('kind-1'))
    processor = await ns.connect('processor')
    admin = await ns.connect('admin')
  })
  /** What the server refused this user so far, from its log: `Publish <subject>`. */
  async function violations(user: string): Promise<string[]> {
    const log = await readFile(join(ns.server.dir, 'nats-server.log'), 'utf8')
    return [
      ...log.matchAll(/(Publish|Subscription) Violation - User "([^"]+)", Subject "([^"]+)"/g),
    ]
      .filter((m) => m[2] === user)
      .map((m) => `${m[1]} ${m[3]}`)
  }

  afterAll(async () => {
    for (const p of procs) p.child.kill('SIGKILL')
    await Promise.all([gateway, device, processor, admin].map((nc) => nc.close()))
    await db.end()
    await ns.cleanup()
  })

  it('refuses clients without a user or with a wrong password', async () => {
    await expect(connect({ servers: ns.url })).rejects.toThrow(/Authorization Violation/i)
    await expect(
      connect({ servers: ns.url, user: 'admin', pass: 'fleetstream-dev-admin' }),
    ).rejects.toThrow(/Authorization Violation/i)
    const r = await runCli(['dlq', 'list'], {
      ...env,
      NATS_USER: 'admin',
      NATS_PASSWORD: 'wrong',
    })
    expect(r.code, r.output).toBe(2)
    expect(r.output).toContain(`'NATS_USER' 'admin' with 'NATS_PASSWORD' was refused by NATS at`)
    const anonymous = await runCli(['dlq', 'list'], env)
    expect(anonymous.code, anonymous.output).toBe(2)
    expect(anonymous.output).toContain(`'NATS_USER' is required by NATS at`)
  })

  it('processors started before set-up wait for the admin, then process as the processor role', async () => {
    // Start-up order does not matter: the processor role may not create streams, so `run`
    // waits for them instead of failing.
    const runEnv = { ...env, ...ns.env('processor') }
    procs.push(spawnCli(['run'], runEnv))
    await waitFor(
      'the processors to wait for set-up',
      () => procs[0]!.output().includes("waiting for 'fleetstream setup'"),
      30_000,
      () => procs[0]!.output(),
    )
    const setup = await runCli(['setup'], { ...env, ...ns.env('admin') })
    expect(setup.code, setup.output).toBe(0)
    expect(setup.output).toContain('stream FLEET_EVENTS: created')

    const js = jetstream(gateway)
    const publisher = createPublisher(js, {
      clock: new HybridLogicalClock({ node: 'gw-roles', maxOffsetMs: 500 }),
    })
    await publisher.publish({
      type: 'sensor.registered',
      deviceId: 'role-1',
      data: { site: 'lab', model: 'm', firmware: '1' },
    })
    // Two hot readings raise an alert: the outbox relay sends a notification.
    await publisher.publish(readingDraft('role-1', 50))
    await publisher.publish(readingDraft('role-1', 51))
    // Poison: the processors park it in FLEET_DLQ.
    await js.publish('fleet.events.role-1.reading', '{"not json', { msgID: 'poison-roles-1' })

    const jsm = await jetstreamManager(admin)
    await waitFor(
      'events applied, poison parked, a notification sent and clock ticks stored',
      async () => {
        const readings = await db.query('select 1 from readings where device_id = $1', ['role-1'])
        const dlq = await jsm.streams.info('FLEET_DLQ')
        const notes = await jsm.streams.info('FLEET_NOTIFICATIONS')
        const ticks = await jsm.streams.info('FLEET_EVENTS', {
          subjects_filter: 'fleet.events._system.tick',
        })
        return (
          readings.rowCount === 2 &&
          dlq.state.messages === PROCESSOR_NAMES.length &&
          notes.state.messages >= 1 &&
          Object.keys(ticks.state.subjects ?? {}).length === 1
        )
      },
      60_000,
      () => procs[0]!.output(),
    )
    const status = await db.query<{ status: string }>(
      'select status from sensor_status where device_id = $1',
      ['role-1'],
    )
    expect(status.rows[0]?.status).toBe('active')
    // The alert-raised notification, in FLEET_NOTIFICATIONS, from the processor role.
    const alerts = await db.query('select 1 from alerts where device_id = $1', ['role-1'])
    expect(alerts.rowCount).toBe(1)
    // Everything the processors did was granted, but creating the streams while they waited
    // (the first one, and any the set-up had not created yet when they looked).
    const refused = new Set(await violations('processor'))
    expect(refused).toContain('Publish $JS.API.STREAM.CREATE.FLEET_EVENTS')
    for (const v of refused)
      expect(v).toMatch(/^Publish \$JS\.API\.STREAM\.CREATE\.FLEET_(EVENTS|DLQ|NOTIFICATIONS)$/)
  })

  it('lets the admin operate: dlq list and redrive, alerts list', async () => {
    const adminEnv = { ...env, ...ns.env('admin') }
    const list = await runCli(['dlq', 'list', '--json'], adminEnv)
    expect(list.code, list.output).toBe(0)
    expect((JSON.parse(list.output) as unknown[]).length).toBe(PROCESSOR_NAMES.length)
    const alerts = await runCli(['alerts', 'list', '--json'], adminEnv)
    expect(alerts.code, alerts.output).toBe(0)
    const redrive = await runCli(['dlq', 'redrive', '--all', '--processor', 'readings'], adminEnv)
    expect(redrive.code, redrive.output).toBe(0)
    expect(redrive.output).toContain('redriven 1 event;')
    // Not even the admin can purge the notifications the outbox relay relies on.
    await expect(
      (await jetstreamManager(admin)).streams.purge('FLEET_NOTIFICATIONS'),
    ).rejects.toThrow(/purge/i)
    expect(await violations('admin')).toEqual([])
  })

  it('lets a device publish every event kind of its own, and a gateway simulate a fleet', async () => {
    const publisher = createPublisher(jetstream(device), {
      clock: new HybridLogicalClock({ node: 'gw-kinds', maxOffsetMs: 500 }),
    })
    const results = await Promise.all([
      publisher.publish({
        type: 'sensor.registered',
        deviceId: 'kind-1',
        data: { site: 'lab', model: 'm', firmware: '1' },
      }),
      publisher.publish(readingDraft('kind-1', 20)),
      publisher.publish({ type: 'heartbeat.received', deviceId: 'kind-1', data: {} }),
      publisher.publish({
        type: 'status.changed',
        deviceId: 'kind-1',
        data: { status: 'maintenance' },
      }),
    ])
    expect(results.every((r) => r.seq > 0 && !r.duplicate)).toBe(true)

    const sim = await runCli(
      ['simulate', '--devices', '5', '--rate', '50', '--duration', '1', '--json'],
      { ...env, ...ns.env('gateway') },
    )
    expect(sim.code, sim.output).toBe(0)
    const summary = sim.output.split('\n').find((l) => l.startsWith('{"sent"'))
    expect(summary, sim.output).toBeDefined()
    const stats = JSON.parse(summary!) as { stored: number }
    expect(stats.stored).toBeGreaterThan(0)
  })

  it('refuses a device and a gateway everything but publishing device events', async () => {
    for (const nc of [device, gateway]) await refusedButEvents(nc)
    // A device speaks for its own id only; a gateway for any device, never for the system.
    await expectRefused(jetstream(device).publish('fleet.events.kind-2.reading', '{}'))
    await expectRefused(jetstream(gateway).publish('fleet.events._system.reading', '{}'))
    const adminJsm = await jetstreamManager(admin)
    expect((await adminJsm.streams.info('FLEET_EVENTS')).config.name).toBe('FLEET_EVENTS')
    expect((await adminJsm.streams.info('FLEET_DLQ')).config.name).toBe('FLEET_DLQ')
  })

  async function refusedButEvents(nc: NatsConnection): Promise<void> {
    const js = jetstream(nc)
    const jsm = await jetstreamManager(nc, { checkAPI: false })
    // It cannot consume: no consumer of its own, none of the processors', no pulls, no
    // subscriptions to stream subjects, and not the processors' reply subjects either.
    await expectRefused(jsm.consumers.add('FLEET_EVENTS', { durable_name: 'spy' }))
    await expectRefused(jsm.consumers.info('FLEET_EVENTS', 'readings'))
    await expectRefused(
      nc.request('$JS.API.CONSUMER.MSG.NEXT.FLEET_EVENTS.readings', '{"batch":1}'),
    )
    await expectRefused(jsm.streams.getMessage('FLEET_EVENTS', { seq: 1 }))
    await expectSubscriptionRefused(nc, 'fleet.events.>')
    await expectSubscriptionRefused(nc, '_INBOX_processor.>')
    await expectSubscriptionRefused(nc, '_INBOX_admin.>')
    // Nor other devices' replies (their PubAcks), nor the MQTT streams' API.
    await expectSubscriptionRefused(nc, '_INBOX.>')
    await expectRefused(jsm.streams.purge('$MQTT_sess'))
    await expectRefused(jsm.streams.purge('FLEET_NOTIFICATIONS'))
    // It cannot touch the DLQ.
    await expectRefused(js.publish('fleet.dlq.readings', '{}'))
    await expectRefused(jsm.streams.info('FLEET_DLQ'))
    await expectRefused(jsm.streams.getMessage('FLEET_DLQ', { seq: 1 }))
    await expectRefused(jsm.streams.purge('FLEET_DLQ'))
    // It cannot delete or change a stream.
    await expectRefused(jsm.streams.delete('FLEET_EVENTS'))
    await expectRefused(jsm.streams.delete('FLEET_DLQ'))
    await expectRefused(
      jsm.streams.add({ name: 'DEVICE_OWN', subjects: ['fleet.events.dev-own.reading'] }),
    )
    // It cannot forge clock ticks (stream time) or operator actions.
    await expectRefused(js.publish('fleet.events._system.tick', '{}'))
    await expectRefused(js.publish('fleet.events.kind-1.alert', '{}'))
    await expectRefused(js.publish('fleet.notifications.alerts.critical.x.y', '{}'))
  }

  it('never shows a gateway what processors pull, though it reads its own PubAcks', async () => {
    const seen: string[] = []
    const sub = gateway.subscribe('_INBOX_gateway.>', {
      callback: (_err, m) => {
        seen.push(m.string())
      },
    })
    const publisher = createPublisher(jetstream(gateway), {
      clock: new HybridLogicalClock({ node: 'gw-snoop', maxOffsetMs: 500 }),
    })
    for (let i = 0; i < 5; i++) await publisher.publish(readingDraft('snoop-1', i))
    await waitFor('the processors to apply them', async () => {
      const r = await db.query('select 1 from readings where device_id = $1', ['snoop-1'])
      return r.rowCount === 5
    })
    sub.unsubscribe()
    // Its own five PubAcks, never an event body.
    expect(seen.length).toBe(5)
    expect(seen.filter((s) => s.includes('eventId'))).toEqual([])
    expect(seen.every((s) => s.includes('"stream":"FLEET_EVENTS"'))).toBe(true)
  })

  it('refuses the processor role device events, other consumers and stream changes', async () => {
    const js = jetstream(processor)
    const jsm = await jetstreamManager(processor, { checkAPI: false })
    await expectRefused(js.publish('fleet.events.role-1.reading', '{}'))
    await expectRefused(js.publish('fleet.events.role-1.alert', '{}'))
    await expectRefused(jsm.streams.delete('FLEET_EVENTS'))
    await expectRefused(jsm.streams.purge('FLEET_DLQ'))
    await expectRefused(jsm.streams.add({ name: 'PROC_OWN', subjects: ['proc.own'] }))
    // Only its own durables: no other consumer, no ephemeral one, nothing on other streams.
    await expectRefused(jsm.consumers.add('FLEET_EVENTS', { durable_name: 'spy' }))
    await expectRefused(jsm.consumers.add('FLEET_EVENTS', {}))
    await expectRefused(jsm.consumers.add('FLEET_DLQ', { durable_name: 'readings' }))
    await expectRefused(jsm.streams.getMessage('FLEET_DLQ', { seq: 1 }))
    // Replies of devices and operators are not its to read.
    await expectSubscriptionRefused(processor, '_INBOX.>')
    await expectSubscriptionRefused(processor, 'fleet.>')
    // What it may do, it may: its consumers, the DLQ stream's info, and a look at the newest
    // event of a subject (the partition layout check; it consumes every event anyway).
    expect((await jsm.consumers.info('FLEET_EVENTS', 'readings')).name).toBe('readings')
    await jsm.streams.getMessage('FLEET_EVENTS', { last_by_subj: 'fleet.events.*.*.*' })
    expect((await jsm.streams.info('FLEET_DLQ')).config.name).toBe('FLEET_DLQ')
  })

  it('keeps the system account to itself', async () => {
    const sys = await ns.connect('system')
    try {
      const r = await sys.request('$SYS.REQ.SERVER.PING', '', { timeout: 5000 })
      expect(r.json<{ server: { name: string } }>().server.name).toBe('fleetstream-dev')
    } finally {
      await sys.close()
    }
    // Other accounts cannot reach system subjects.
    await expect(admin.request('$SYS.REQ.SERVER.PING', '', { timeout: 1000 })).rejects.toThrow()
  })
})
