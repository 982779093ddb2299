import { spawn } from 'node:child_process'
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { jetstream, jetstreamManager, type JetStreamManager } from '@nats-io/jetstream'
import { connect, type NatsConnection } from '@nats-io/transport-node'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { DeviceCredential } from '../cli/commands/devices-command.ts'
import { readNatsFigures } from '../app/fleet-state.ts'
import type { Config } from '../infra/config.ts'
import { isPermissionViolation } from '../infra/failures.ts'
import { createPublisher, type EventDraft } from '../infra/publisher.ts'
import { ensureStreams } from '../infra/streams.ts'
import type { FleetEvent } from '../schemas/events.ts'
import { HybridLogicalClock } from '../schemas/hlc.ts'
import {
  freshDatabase,
  HarnessError,
  setFleetMaxFile,
  startRoleNatsServer,
  type RoleNatsServer,
} from './harness/test-servers.ts'
import { findOnPath, run } from '../testbed/processes.ts'
import { readingDraft, repoRoot, runCli, testConfig, testEnv, waitFor } from './fixtures.ts'

/**
 * What a hostile device can do on a server started with the repository's own nats.conf
 * (issue 12, items 6, 7 and 10): it names reply subjects, snoops on inboxes, and speaks for
 * other devices. Counts messages in the streams before and after, never compares sets.
 */
describe('devices are untrusted on the wire', () => {
  let ns: RoleNatsServer
  let admin: { nc: NatsConnection; jsm: JetStreamManager }
  let mosquittoPub: string
  const creds: Record<string, DeviceCredential> = {}
  const conns: NatsConnection[] = []
  let stamp: <T extends FleetEvent['type']>(draft: EventDraft<T>) => FleetEvent

  const device = async (id: string): Promise<NatsConnection> => {
    const nc = await ns.connectDevice(creds[id]!)
    conns.push(nc)
    return nc
  }
  /** One NATS login attempt with a device's credential. */
  const login = (c: DeviceCredential) =>
    connect({ servers: ns.url, user: c.user, pass: c.password }).then((nc) => nc.close())
  /** mosquitto_pub -q 1 as an MQTT device; resolves with its exit code and output. */
  const mqttPublish = (c: DeviceCredential, topic: string, body: string, extra: string[] = []) =>
    run(
      mosquittoPub,
      [
        ...['-h', '127.0.0.1', '-p', String(ns.mqttPort), '-q', '1'],
        ...['-i', c.mqttClientId ?? c.user, '-u', c.user, '-P', c.password],
        // A later -i wins: `extra` may give another client id.
        ...extra,
        ...['-t', topic, '-m', body],
      ],
      { cwd: repoRoot, timeoutMs: 15_000 },
    )
  const messages = async (stream: string) => (await admin.jsm.streams.info(stream)).state
  const storedOn = async (subject: string): Promise<number> => {
    const info = await admin.jsm.streams.info('FLEET_EVENTS', { subjects_filter: subject })
    return info.state.subjects?.[subject] ?? 0
  }
  /** Messages in each of MQTT's streams (account MQTT_DEVICES), from the monitoring endpoint. */
  const mqttStreams = async (): Promise<Record<string, number>> => {
    const r = await fetch(`${ns.monitorUrl}/jsz?accounts=true&streams=true`)
    const jsz = (await r.json()) as {
      account_details?: {
        name: string
        stream_detail?: { name: string; state: { messages: number } }[]
      }[]
    }
    const acc = jsz.account_details?.find((a) => a.name === 'MQTT_DEVICES')
    return Object.fromEntries((acc?.stream_detail ?? []).map((s) => [s.name, s.state.messages]))
  }

  beforeAll(async () => {
    const bin = await findOnPath('mosquitto_pub')
    if (bin === undefined) throw new HarnessError('mosquitto_pub not found on PATH')
    mosquittoPub = bin
    ns = await startRoleNatsServer()
    admin = await ns.admin()
    // The streams, as `fleetstream setup` makes them (no database needed here).
    await ensureStreams(admin.jsm, testConfig(ns.url, 'postgres://unused@127.0.0.1/x').streams)
    for (const id of ['dev-a', 'dev-b']) creds[id] = await ns.addDevice(id)
    for (const id of ['mqtt-a', 'mqtt-b']) creds[id] = await ns.addDevice(id, { mqtt: true })
    const publisher = createPublisher(jetstream(admin.nc), {
      clock: new HybridLogicalClock({ node: 'trust', maxOffsetMs: 500 }),
    })
    stamp = (draft) => publisher.stamp(draft)
  })
  afterAll(async () => {
    await Promise.all(conns.map((c) => c.close().catch(() => undefined)))
    await admin.nc.close()
    await ns.cleanup()
  })

  it('lets no reply subject a device names reach the FLEET account (item 6)', async () => {
    const js = jetstream(admin.nc)
    // Nine notifications the outbox relay relies on, and DLQ entries at sequences 1..30.
    for (let i = 0; i < 9; i++)
      await js.publish(`fleet.notifications.alerts.critical.n${i}.x`, '{}')
    for (let i = 0; i < 30; i++) await js.publish('fleet.dlq.readings', `{"n":${i}}`)
    // MQTT's streams hold a persistent session and a retained message.
    const m = await mqttPublish(
      creds['mqtt-a']!,
      'fleet/events/mqtt-a/reading',
      JSON.stringify(stamp(readingDraft('mqtt-a', 1))),
      ['-c', '-r'],
    )
    expect(m.code, m.output).toBe(0)
    const mqttBefore = await mqttStreams()
    expect(mqttBefore.$MQTT_sess, JSON.stringify(mqttBefore)).toBeGreaterThan(0)
    expect(mqttBefore.$MQTT_rmsgs, JSON.stringify(mqttBefore)).toBeGreaterThan(0)
    const notesBefore = await messages('FLEET_NOTIFICATIONS')
    const dlqBefore = await messages('FLEET_DLQ')
    const eventsBefore = await messages('FLEET_EVENTS')

    const replies = [
      '$JS.API.STREAM.PURGE.FLEET_NOTIFICATIONS',
      '$JS.API.STREAM.MSG.DELETE.FLEET_DLQ',
      '$JS.API.STREAM.PURGE.FLEET_DLQ',
      '$JS.API.STREAM.PURGE.$MQTT_sess',
      '$JS.API.STREAM.PURGE.$MQTT_rmsgs',
      '$JS.API.STREAM.PURGE.$MQTT_msgs',
      '$JS.API.STREAM.DELETE.FLEET_NOTIFICATIONS',
      'fleet.notifications.alerts.critical.x',
      'fleet.dlq.readings',
      'fleet.events._system.tick',
      'fleet.events.dev-b.status',
      'fleet.events.victim-7.status',
    ]
    // A device and a gateway each publish a valid event with every one of those replies; the
    // stream stores the event and answers the reply.
    const a = await device('dev-a')
    const gateway = await ns.connect('gateway')
    conns.push(gateway)
    for (const nc of [a, gateway]) {
      for (const reply of replies) {
        nc.publish('fleet.events.dev-a.reading', JSON.stringify(stamp(readingDraft('dev-a', 2))), {
          reply,
        })
      }
      await nc.flush()
    }
    // Every publish was stored: their PubAcks have been sent.
    await waitFor(
      'the injected publishes stored',
      async () => (await messages('FLEET_EVENTS')).messages === eventsBefore.messages + 24,
    )
    // ... and answered no request: nothing purged, deleted or stored in FLEET.
    expect(await messages('FLEET_NOTIFICATIONS')).toMatchObject({
      messages: notesBefore.messages,
      first_seq: notesBefore.first_seq,
    })
    const dlqAfter = await messages('FLEET_DLQ')
    expect(dlqAfter.messages).toBe(dlqBefore.messages)
    expect(dlqAfter.last_seq - dlqAfter.first_seq + 1).toBe(dlqAfter.messages)
    expect(await storedOn('fleet.events._system.tick')).toBe(0)
    expect(await storedOn('fleet.events.dev-b.status')).toBe(0)
    expect(await storedOn('fleet.events.victim-7.status')).toBe(0)
    expect(await storedOn('fleet.events.dev-a.reading')).toBe(24)
    expect(await mqttStreams()).toEqual(mqttBefore)
  })

  it("shows a device its own replies only, not other devices' or operators' (item 10)", async () => {
    const [a, b] = [await device('dev-a'), await device('dev-b')]
    // The inbox wildcard that showed every PubAck is refused; the device's own inbox is not.
    const wide = b.subscribe('_INBOX.>')
    await b.flush()
    const closed = await Promise.race([
      wide.closed,
      new Promise((r) => setTimeout(r, 5000, 'still open')),
    ])
    expect(isPermissionViolation(closed), String(closed)).toBe(true)
    const seen: string[] = []
    const own = b.subscribe(`${creds['dev-b']!.inboxPrefix!}.>`, {
      callback: (_e, m) => {
        seen.push(m.string())
      },
    })
    await b.flush()
    // Another device, the gateway and an operator without an inbox prefix make requests whose
    // replies carry PubAcks and event bodies.
    const gateway = await ns.connect('gateway')
    conns.push(gateway)
    for (let i = 0; i < 5; i++) {
      await jetstream(a).publish(
        'fleet.events.dev-a.reading',
        JSON.stringify(stamp(readingDraft('dev-a', i))),
      )
      await jetstream(gateway).publish(
        'fleet.events.gw-1.heartbeat',
        JSON.stringify(stamp({ type: 'heartbeat.received', deviceId: 'gw-1', data: {} })),
      )
    }
    const plain = await ns.connect('admin', { inboxPrefix: '_INBOX' })
    conns.push(plain)
    const jsm = await jetstreamManager(plain)
    const body = await jsm.streams.getMessage('FLEET_EVENTS', {
      last_by_subj: 'fleet.events.dev-a.reading',
    })
    expect(body?.string()).toContain('eventId')
    // Its own PubAck, and nothing else.
    await jetstream(b).publish(
      'fleet.events.dev-b.heartbeat',
      JSON.stringify(stamp({ type: 'heartbeat.received', deviceId: 'dev-b', data: {} })),
    )
    await waitFor('its own PubAck', () => seen.length >= 1)
    await b.flush()
    own.unsubscribe()
    expect(seen.length).toBe(1)
    expect(seen[0]).toContain('"stream":"FLEET_EVENTS"')
    expect(seen.filter((s) => s.includes('eventId'))).toEqual([])
  })

  it('lets a device credential speak for its own device id only, over NATS and MQTT (item 7)', async () => {
    const a = await device('dev-a')
    const victimBefore = await storedOn('fleet.events.victim-7.status')
    const decommission = JSON.stringify(
      stamp({ type: 'status.changed', deviceId: 'victim-7', data: { status: 'decommissioned' } }),
    )
    const err = await jetstream(a)
      .publish('fleet.events.victim-7.status', decommission)
      .then(
        () => 'allowed',
        (e: unknown) => e,
      )
    expect(isPermissionViolation(err), String(err)).toBe(true)
    await expect(
      jetstream(a).publish(
        'fleet.events.dev-b.reading',
        JSON.stringify(stamp(readingDraft('dev-b', -273))),
      ),
    ).rejects.toSatisfy(isPermissionViolation)
    // Over MQTT: the publish is refused by the server (MQTT 3.1.1 acks it regardless).
    const r = await mqttPublish(creds['mqtt-a']!, 'fleet/events/victim-7/status', decommission)
    expect(r.code, r.output).toBe(0)
    const own = await mqttPublish(
      creds['mqtt-a']!,
      'fleet/events/mqtt-a/heartbeat',
      JSON.stringify(stamp({ type: 'heartbeat.received', deviceId: 'mqtt-a', data: {} })),
    )
    expect(own.code, own.output).toBe(0)
    await waitFor(
      'its own MQTT event',
      async () => (await storedOn('fleet.events.mqtt-a.heartbeat')) === 1,
    )
    expect(await storedOn('fleet.events.victim-7.status')).toBe(victimBefore)
    // Each credential logs in over its own transport only.
    const overMqtt = await mqttPublish(creds['dev-a']!, 'fleet/events/dev-a/reading', '{}')
    expect(overMqtt.code, overMqtt.output).not.toBe(0)
    await expect(login(creds['mqtt-a']!)).rejects.toThrow(/Authorization Violation/i)
  })

  it("lets a second MQTT client with a device's client id disconnect it, never speak for it (item 7, nats-server 2.9)", async () => {
    // mqtt-a stays connected: mosquitto_pub -l publishes stdin's lines until stdin closes.
    const a = creds['mqtt-a']!
    const first = spawn(
      mosquittoPub,
      [
        ...['-d', '-h', '127.0.0.1', '-p', String(ns.mqttPort), '-q', '1', '-i', 'mqtt-a'],
        ...['-u', a.user, '-P', a.password, '-t', 'fleet/events/mqtt-a/heartbeat', '-l'],
      ],
      { stdio: ['pipe', 'pipe', 'pipe'] },
    )
    let out = ''
    first.stdout.on('data', (d: Buffer) => (out += d.toString()))
    first.stderr.on('data', (d: Buffer) => (out += d.toString()))
    try {
      const connected = async () => {
        const connz = await (await fetch(`${ns.monitorUrl}/connz?acc=MQTT_DEVICES`)).text()
        return connz.includes('"mqtt_client": "mqtt-a"') || connz.includes('"mqtt_client":"mqtt-a"')
      }
      await waitFor('mqtt-a connected', connected, 30_000, () => out)
      const before = await storedOn('fleet.events.mqtt-a.reading')
      // mqtt-b, logged in as itself, takes mqtt-a's client id and tries to speak for it.
      const r = await mqttPublish(
        creds['mqtt-b']!,
        'fleet/events/mqtt-a/reading',
        JSON.stringify(stamp(readingDraft('mqtt-a', -273))),
        ['-i', 'mqtt-a'],
      )
      expect(r.code, r.output).toBe(0)
      const log = await readFile(join(ns.server.dir, 'nats-server.log'), 'utf8')
      const replaced = log.match(
        /Replacing old client .* since both have the same client ID "mqtt-a"/g,
      )
      expect(replaced?.length ?? 0).toBeGreaterThanOrEqual(1)
      expect(await storedOn('fleet.events.mqtt-a.reading')).toBe(before)
    } finally {
      first.stdin.end()
      first.kill()
    }
  })

  it('lists devices and revokes one: its live connection is closed, it cannot log in again', async () => {
    const list = await runCli(['devices', 'list', '--json'], ns.devicesEnv())
    expect(list.code, list.output).toBe(0)
    expect(JSON.parse(list.output)).toEqual([
      { deviceId: 'dev-a', transport: 'nats' },
      { deviceId: 'dev-b', transport: 'nats' },
      { deviceId: 'mqtt-a', transport: 'mqtt' },
      { deviceId: 'mqtt-b', transport: 'mqtt' },
    ])
    const b = await device('dev-b')
    const closed = b.closed()
    const revoke = await runCli(['devices', 'revoke', 'dev-b'], ns.devicesEnv())
    expect(revoke.code, revoke.output).toBe(0)
    expect(revoke.output).toContain('device dev-b revoked; nats-server (pid')
    expect(String(await closed)).toMatch(/Authorization Violation/i)
    await expect(login(creds['dev-b']!)).rejects.toThrow(/Authorization Violation/i)
    // The others go on.
    const a = await device('dev-a')
    await jetstream(a).publish(
      'fleet.events.dev-a.heartbeat',
      JSON.stringify(stamp({ type: 'heartbeat.received', deviceId: 'dev-a', data: {} })),
    )

    // Bad usage names the field, the rule and the value.
    const bad = await runCli(['devices', 'add', 'Sensor 7'], ns.devicesEnv())
    expect(bad.code).toBe(2)
    expect(bad.output).toContain(`'deviceId' must match /^[a-z0-9-]{1,64}$/, got 'Sensor 7'`)
    const twice = await runCli(['devices', 'add', 'dev-a'], ns.devicesEnv())
    expect(twice.code).toBe(2)
    expect(twice.output).toContain(`device 'dev-a' already has a credential`)
    const unknown = await runCli(['devices', 'revoke', 'nobody'], ns.devicesEnv())
    expect(unknown.code).toBe(2)
    expect(unknown.output).toContain(`no device 'nobody'`)
  })
})

/**
 * Item 9: one device fills FLEET_EVENTS (no purge, no delete) so that every other device is
 * refused. nats-server 2.9 has no per-user rate or byte limit for config-file users, so the
 * recovery is the operator's (README.md, "A device that floods the stream"): revoke the device,
 * raise the FLEET account's storage limit, reload.
 */
describe('a device that fills the stream', () => {
  let ns: RoleNatsServer
  let env: Record<string, string>
  let config: Config
  let admin: { nc: NatsConnection; jsm: JetStreamManager }
  const conns: NatsConnection[] = []
  let stamp: <T extends FleetEvent['type']>(draft: EventDraft<T>) => FleetEvent

  beforeAll(async () => {
    // The FLEET account's file storage, 9GB in accounts.conf, made small enough to fill.
    ns = await startRoleNatsServer({ fleetMaxFile: '256KB' })
    admin = await ns.admin()
    env = { ...testEnv(ns.url, await freshDatabase()), ...ns.env('admin') }
    const setup = await runCli(['setup'], env)
    expect(setup.code, setup.output).toBe(0)
    config = testConfig(ns.url, 'postgres://unused@127.0.0.1/x')
    const publisher = createPublisher(jetstream(admin.nc), {
      clock: new HybridLogicalClock({ node: 'flood', maxOffsetMs: 500 }),
    })
    stamp = (draft) => publisher.stamp(draft)
  })
  afterAll(async () => {
    await Promise.all(conns.map((c) => c.close().catch(() => undefined)))
    await admin.nc.close()
    await ns.cleanup()
  })

  it('refuses every device once it is full; the operator revokes the device and raises the limit', async () => {
    const [flooder, other] = [await ns.addDevice('flood-1'), await ns.addDevice('other-1')]
    const f = await ns.connectDevice(flooder)
    const o = await ns.connectDevice(other)
    conns.push(f, o)
    /** What `fleetstream status` reports (and `--max-storage-use` checks): percent used. */
    const use = async () => (await readNatsFigures(admin.jsm, config, [])).stream.storageUsePercent
    expect(await use()).toBeLessThan(80)
    // Big junk until it no longer fits, then small junk until nothing does.
    let stored = 0
    let refusal: unknown
    for (const size of [4096, 64]) {
      const junk = JSON.stringify({ junk: 'x'.repeat(size) })
      refusal = undefined
      while (refusal === undefined && stored < 5000) {
        await jetstream(f)
          .publish('fleet.events.flood-1.reading', junk)
          .then(
            () => stored++,
            (err: unknown) => (refusal = err),
          )
      }
    }
    expect(String(refusal)).toMatch(/resource limits exceeded/i)
    // What an operator's monitoring sees, and would have seen crossing a threshold before.
    expect(await use()).toBeGreaterThan(95)
    const status = await runCli(
      ['status', '--max-storage-use', '80', '--window', '0', '--timeout', '10'],
      env,
    )
    expect(status.code, status.output).toBe(3)
    expect(status.output).toMatch(
      /FLEET_EVENTS: [\d.]+% of its storage limit used > --max-storage-use 80/,
    )
    // Nothing was dropped to make room: every stored event is still there, from sequence 1.
    expect((await admin.jsm.streams.info('FLEET_EVENTS')).state).toMatchObject({
      messages: stored,
      first_seq: 1,
    })
    const reading = (id: string) => JSON.stringify(stamp(readingDraft(id, 20)))
    // Everybody else is refused now, and the junk cannot be removed.
    await expect(
      jetstream(o).publish('fleet.events.other-1.reading', reading('other-1')),
    ).rejects.toThrow(/resource limits exceeded/i)
    await expect(admin.jsm.streams.purge('FLEET_EVENTS')).rejects.toThrow(/purge/i)
    await expect(admin.jsm.streams.deleteMessage('FLEET_EVENTS', 1)).rejects.toThrow(/delete/i)

    // Recovery: revoke the device (its connection is closed on reload) ...
    const closed = f.closed()
    const revoke = await runCli(['devices', 'revoke', 'flood-1'], ns.devicesEnv())
    expect(revoke.code, revoke.output).toBe(0)
    expect(String(await closed)).toMatch(/Authorization Violation/i)
    // ... raise the FLEET account's max_file in accounts.conf and reload.
    await setFleetMaxFile(ns.configDir, '1MB')
    process.kill(ns.server.pid, 'SIGHUP')
    // While the server reloads the accounts, their JetStream API does not answer for a moment.
    await waitFor('the new limit to take', async () => {
      const a = await admin.jsm.getAccountInfo().catch(() => undefined)
      return a?.limits.max_storage === 1024 * 1024
    })
    const ack = await jetstream(o).publish('fleet.events.other-1.reading', reading('other-1'))
    expect(ack.seq).toBeGreaterThan(stored)
    expect((await admin.jsm.streams.info('FLEET_EVENTS')).state).toMatchObject({
      messages: stored + 1,
      first_seq: 1,
    })
  })
})
