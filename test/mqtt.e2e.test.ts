import { readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { jetstream, type JetStreamManager } from '@nats-io/jetstream'
import type { NatsConnection } from '@nats-io/transport-node'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { DeviceCredential } from '../cli/commands/devices-command.ts'
import type { DeadLetterEntry } from '../processors/dlq/inspect.ts'
import { createPublisher, type EventDraft } from '../infra/publisher.ts'
import type { FleetEvent } from '../schemas/events.ts'
import { HybridLogicalClock } from '../schemas/hlc.ts'
import {
  freshDatabase,
  HarnessError,
  startRoleNatsServer,
  type RoleNatsServer,
} from './harness/test-servers.ts'
import { findOnPath, run } from '../testbed/processes.ts'
import {
  readingDraft,
  repoRoot,
  runCli,
  spawnCli,
  testEnv,
  tickDraft,
  waitFor,
  type CliProcess,
} from './fixtures.ts'

const MOSQUITTO_PUB_NOT_FOUND =
  "mosquitto_pub not found on PATH: install it with 'apt-get install mosquitto-clients' (or run 'bash .ci/run')"

/**
 * Sensors that speak MQTT: a real MQTT client (Debian's mosquitto_pub) publishes QoS 1 to
 * nats-server's MQTT listener, started from the repository's nats.conf, and the processors
 * apply the events like any other.
 */
describe('MQTT devices', () => {
  let ns: RoleNatsServer
  let db: pg.Client
  let env: Record<string, string>
  let admin: { nc: NatsConnection; jsm: JetStreamManager }
  let processors: CliProcess
  let mosquittoPub: string
  let stamp: <T extends FleetEvent['type']>(draft: EventDraft<T>) => FleetEvent

  /** MQTT credentials of the devices these tests use (`fleetstream devices add <id> --mqtt`). */
  const creds: Record<string, DeviceCredential> = {}
  /**
   * mosquitto_pub -q 1 to `topic` as `user` (by default the device the topic names, with its
   * own credential); resolves with its exit code and output.
   */
  const publish = (topic: string, body: string, user?: string, password?: string) => {
    const u = user ?? topic.split('/')[2] ?? ''
    return run(
      mosquittoPub,
      [
        ...['-h', '127.0.0.1', '-p', String(ns.mqttPort), '-q', '1', '-i', `test-${u}`],
        ...['-u', u, '-P', password ?? creds[u]?.password ?? 'none'],
        ...['-t', topic, '-m', body],
      ],
      { cwd: repoRoot, timeoutMs: 15_000 },
    )
  }

  const storedOn = async (subject: string): Promise<number> => {
    const info = await admin.jsm.streams.info('FLEET_EVENTS', { subjects_filter: subject })
    return info.state.subjects?.[subject] ?? 0
  }

  const caughtUp = () =>
    waitFor('the processors to catch up', async () => {
      const infos = await Promise.all(
        ['sensor-status', 'readings', 'alerts'].map((n) =>
          admin.jsm.consumers.info('FLEET_EVENTS', n),
        ),
      )
      return infos.every((i) => i.num_pending === 0 && i.num_ack_pending === 0)
    })

  beforeAll(async () => {
    const bin = await findOnPath('mosquitto_pub')
    if (bin === undefined) throw new HarnessError(MOSQUITTO_PUB_NOT_FOUND)
    mosquittoPub = bin
    ns = await startRoleNatsServer()
    const dbUrl = await freshDatabase()
    env = testEnv(ns.url, dbUrl)
    db = new pg.Client(dbUrl)
    await db.connect()
    admin = await ns.admin()
    for (const id of ['mqtt-7', 'mqtt-8', 'mqtt-9', 'mqtt-10', 'mqtt-11'])
      creds[id] = await ns.addDevice(id, { mqtt: true })
    const setup = await runCli(['setup'], { ...env, ...ns.env('admin') })
    expect(setup.code, setup.output).toBe(0)
    // MQTT's message stream, sized like FLEET_EVENTS (what a PUBACK means, below).
    expect(setup.output).toContain('stream $MQTT_msgs: created')
    processors = spawnCli(['run', '--no-clock'], { ...env, ...ns.env('processor') })
    const publisher = createPublisher(jetstream(admin.nc), {
      clock: new HybridLogicalClock({ node: 'mqtt-gw', maxOffsetMs: 500 }),
    })
    stamp = (draft) => publisher.stamp(draft)
  })
  afterAll(async () => {
    processors.child.kill('SIGKILL')
    await admin.nc.close()
    await db.end()
    await ns.cleanup()
  })

  it('publishes QoS 1 into FLEET_EVENTS, and the processors apply it like any event', async () => {
    const registered = stamp({
      type: 'sensor.registered',
      deviceId: 'mqtt-7',
      data: { site: 'roof', model: 'mq-1', firmware: '2.1' },
    })
    const reading = stamp(readingDraft('mqtt-7', 21.5))
    for (const [topic, e] of [
      ['fleet/events/mqtt-7/registered', registered],
      ['fleet/events/mqtt-7/reading', reading],
    ] as const) {
      const r = await publish(topic, JSON.stringify(e))
      expect(r.code, r.output).toBe(0)
    }

    await waitFor(
      'the MQTT events in the read models',
      async () => {
        const r = await db.query('select 1 from readings where event_id = $1', [reading.eventId])
        const s = await db.query('select 1 from sensor_status where device_id = $1', ['mqtt-7'])
        return r.rowCount === 1 && s.rowCount === 1
      },
      30_000,
      () => processors.output(),
    )
    await caughtUp()
    const status = await db.query<{ status: string; site: string; model: string }>(
      'select status, site, model from sensor_status where device_id = $1',
      ['mqtt-7'],
    )
    expect(status.rows).toEqual([{ status: 'active', site: 'roof', model: 'mq-1' }])
    // Stored as published: the same envelope, on the NATS subject, without a message id.
    const m = await admin.jsm.streams.getMessage('FLEET_EVENTS', {
      last_by_subj: 'fleet.events.mqtt-7.reading',
    })
    expect(m?.json<FleetEvent>()).toEqual(reading)
    expect(m?.header.get('Nats-Msg-Id') ?? '').toBe('')
  })

  it('stores a retried QoS 1 publish again, and the read models apply it once', async () => {
    // A device that never saw its PUBACK sends the same event again. MQTT carries no message
    // id, so the stream cannot deduplicate: the read models do, by eventId.
    const reading = stamp(readingDraft('mqtt-8', 40.25, 'humidity'))
    const before = await storedOn('fleet.events.mqtt-8.reading')
    for (let i = 0; i < 3; i++) {
      const r = await publish('fleet/events/mqtt-8/reading', JSON.stringify(reading))
      expect(r.code, r.output).toBe(0)
    }
    await waitFor('three copies in the stream', async () => {
      return (await storedOn('fleet.events.mqtt-8.reading')) === before + 3
    })
    await caughtUp()

    const rows = await db.query<{ n: number }>(
      'select count(*)::int as n from readings where event_id = $1',
      [reading.eventId],
    )
    expect(rows.rows[0]?.n).toBe(1)
    const rollup = await db.query<{ count: number; sum: string }>(
      `select count::int, sum::text from readings_per_minute where device_id = 'mqtt-8' and metric = 'humidity'`,
    )
    expect(rollup.rows).toEqual([{ count: 1, sum: '40.25' }])
    const latest = await db.query<{ value: number; event_id: string }>(
      `select value, event_id from latest_readings where device_id = 'mqtt-8'`,
    )
    expect(latest.rows).toEqual([{ value: 40.25, event_id: reading.eventId }])
  })

  it('parks a bad MQTT payload in the DLQ like a bad NATS one', async () => {
    const r = await publish('fleet/events/mqtt-9/reading', '{"temperature": 21')
    expect(r.code, r.output).toBe(0)
    await caughtUp()
    const list = await runCli(['dlq', 'list', '--json'], { ...env, ...ns.env('admin') })
    expect(list.code, list.output).toBe(0)
    const entries = (JSON.parse(list.output) as DeadLetterEntry[]).filter(
      (e) => e.subject === 'fleet.events.mqtt-9.reading',
    )
    expect(entries.map((e) => [e.processor, e.reason]).sort()).toEqual([
      ['alerts', 'invalid-json'],
      ['readings', 'invalid-json'],
      ['sensor-status', 'invalid-json'],
    ])
  })

  it('enforces device credentials', async () => {
    const e = stamp(readingDraft('mqtt-10', 1))
    const body = JSON.stringify(e)
    const wrong = await publish('fleet/events/mqtt-10/reading', body, 'mqtt-10', 'not-the-password')
    expect(wrong.code, wrong.output).not.toBe(0)
    expect(wrong.output).toMatch(/not authori[sz]ed/i)
    // The processor, admin and gateway roles may not connect over MQTT, even with their own
    // passwords.
    for (const role of ['processor', 'admin', 'gateway'] as const) {
      const r = await publish(
        'fleet/events/mqtt-10/reading',
        body,
        role,
        ns.secrets.roles[role].password,
      )
      expect(r.code, `${role}: ${r.output}`).not.toBe(0)
    }
    const anonymous = await run(
      mosquittoPub,
      [
        '-h',
        '127.0.0.1',
        '-p',
        String(ns.mqttPort),
        '-q',
        '1',
        '-t',
        'fleet/events/mqtt-10/reading',
        '-m',
        body,
      ],
      { cwd: repoRoot, timeoutMs: 15_000 },
    )
    expect(anonymous.code, anonymous.output).not.toBe(0)

    // A device's permissions hold over MQTT too. MQTT 3.1.1 has no way to refuse a QoS 1
    // publish (the PUBACK comes regardless), so the proof is that nothing was stored.
    const dlqBefore = (await admin.jsm.streams.info('FLEET_DLQ')).state.messages
    const mqtt7Before = await storedOn('fleet.events.mqtt-7.reading')
    const tick = stamp(tickDraft(Date.now()))
    const as10 = (topic: string, b: string) => publish(topic, b, 'mqtt-10')
    await as10('fleet/events/_system/tick', JSON.stringify(tick))
    await as10('fleet/dlq/readings', body)
    await as10('fleet/events/mqtt-10/alert', body)
    // Nor for another device.
    await as10('fleet/events/mqtt-7/reading', body)
    await admin.nc.flush()
    expect(await storedOn('fleet.events._system.tick')).toBe(0)
    expect(await storedOn('fleet.events.mqtt-10.alert')).toBe(0)
    expect(await storedOn('fleet.events.mqtt-10.reading')).toBe(0)
    expect(await storedOn('fleet.events.mqtt-7.reading')).toBe(mqtt7Before)
    expect((await admin.jsm.streams.info('FLEET_DLQ')).state.messages).toBe(dlqBefore)
  })

  it('refuses what FLEET_EVENTS would not store: no PUBACK for an oversize payload (item 8)', async () => {
    // FLEET_EVENTS takes at most FLEET_MAX_MSG_BYTES (16 KiB) of headers and body; MQTT adds a
    // short header. nats-server 2.9 sends the PUBACK only once MQTT's own stream stored the
    // message, and setup gave that stream the same limit.
    const body = JSON.stringify(stamp(readingDraft('mqtt-11', 1)))
    /** The event padded with trailing spaces to `size` bytes, from a file (argv is too small). */
    const publishPadded = async (size: number) => {
      const file = join(ns.server.dir, `payload-${size}`)
      await writeFile(file, body + ' '.repeat(size - body.length))
      const c = creds['mqtt-11']!
      return run(
        mosquittoPub,
        [
          ...['-h', '127.0.0.1', '-p', String(ns.mqttPort), '-q', '1', '-i', 'test-mqtt-11'],
          ...['-u', c.user, '-P', c.password, '-t', 'fleet/events/mqtt-11/reading', '-f', file],
        ],
        { cwd: repoRoot, timeoutMs: 15_000 },
      )
    }
    const before = await storedOn('fleet.events.mqtt-11.reading')
    const ok = await publishPadded(16_000)
    expect(ok.code, ok.output).toBe(0)
    expect(await storedOn('fleet.events.mqtt-11.reading')).toBe(before + 1)
    for (const size of [20 * 1024, 1_100_000]) {
      const r = await publishPadded(size)
      // mosquitto_pub: 'Error: The connection was lost.' (exit 7): the server closed it, no PUBACK.
      expect(r.code, `${size} bytes: ${r.output}`).not.toBe(0)
      expect(r.output).toMatch(/connection was lost/i)
    }
    expect(await storedOn('fleet.events.mqtt-11.reading')).toBe(before + 1)
    const log = await readFile(join(ns.server.dir, 'nats-server.log'), 'utf8')
    expect(log.match(/"test-mqtt-11" - message size exceeds maximum allowed/g)?.length).toBe(2)
  })
})
