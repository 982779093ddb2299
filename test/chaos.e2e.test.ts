import { writeFile } from 'node:fs/promises'
import { jetstream, jetstreamManager, type JetStreamManager } from '@nats-io/jetstream'
import { headers, type MsgHdrs, type NatsConnection } from '@nats-io/transport-node'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { createPublisher, eventHeaders, type Publisher } from '../infra/publisher.ts'
import { PROCESSOR_NAMES } from '../processors/processor-registry.ts'
import type { FleetEvent } from '../schemas/events.ts'
import { decodeHlc, encodeHlc, HybridLogicalClock } from '../schemas/hlc.ts'
import { eventSubject, Headers } from '../schemas/subjects.ts'
import {
  HarnessError,
  startNatsCluster,
  startPostgres,
  type NatsCluster,
  type PgCluster,
} from './harness/test-servers.ts'
import { findOnPath, run } from '../testbed/processes.ts'
import {
  repoRoot,
  rulesFile,
  runCli,
  spawnCli,
  testEnv,
  waitFor,
  type CliProcess,
} from './fixtures.ts'

/**
 * A fleet through real failures, checked against an oracle computed from the publisher's own
 * record of what the stream acknowledged. CHAOS_SECONDS and CHAOS_RATE scale it: the CI run is
 * short; `npm run chaos` runs the long one. CHAOS_REPORT names a JSON file for the figures.
 * CHAOS_LONG_OUTAGE_MS > 0 adds one Postgres outage that long, beside the other faults (the long
 * run: 130 s, longer than the DLQ's old two-minute duplicate window).
 *
 * Hostile input rides along with the valid events, all on the project's real accounts
 * (infra/nats/cluster-node.conf): poison Postgres would refuse, messages whose full DLQ copy
 * would not fit FLEET_DLQ, headers a device sets to confuse the processors or the DLQ, reply
 * subjects naming FLEET's JetStream API and DLQ (from a device of its own and the gateway), and
 * an MQTT device. DLQ entries are counted per (processor, Fleet-Dlq-Key): each expected one once.
 */
const SECONDS = Number(process.env.CHAOS_SECONDS ?? 30)
const RATE = Number(process.env.CHAOS_RATE ?? 500)
const DEVICES = 200
const OUTAGE_MS = Number(process.env.CHAOS_OUTAGE_MS ?? 4000)
const LONG_OUTAGE_MS = Number(process.env.CHAOS_LONG_OUTAGE_MS ?? 0)
/** FLEET_EVENTS's max_msg_size (FLEET_MAX_MSG_BYTES's default; testEnv leaves it). */
const MAX_MSG_BYTES = 16 * 1024
/** A device with a NATS credential of its own (account DEVICES), and one speaking MQTT. */
const NATS_DEVICE = 'chaos-dev'
const MQTT_DEVICE = 'chaos-mqtt'
/** Reply subjects a device names, hoping FLEET's JetStream API or DLQ takes the PubAck. */
const INJECTED_REPLIES = [
  '$JS.API.STREAM.PURGE.FLEET_NOTIFICATIONS',
  '$JS.API.STREAM.MSG.DELETE.FLEET_DLQ',
  'fleet.dlq.readings',
] as const
/** Which processors read (and so park) an event on `subject`. */
const readersOf = (subject: string) =>
  PROCESSOR_NAMES.filter((n) => n !== 'readings' || subject.endsWith('.reading'))

const t0 = Date.now()
/** Progress on stderr, so a stuck run says where it is. */
function log(line: string): void {
  process.stderr.write(`[chaos +${((Date.now() - t0) / 1000).toFixed(1)} s] ${line}\n`)
}

interface Fault {
  readonly kind: string
  readonly at: number
  /** When the service came back (the killed process or server restarted). */
  restoredAt: number
  /** When every processor had caught up with the stream as it stood at `restoredAt`. */
  recoveredAt: number
}

describe('chaos', () => {
  let cluster: NatsCluster
  let postgres: PgCluster
  let env: Record<string, string>
  /** The operator's view (admin role): stream and consumer info, reading the stream. */
  let nc: NatsConnection
  let jsm: JetStreamManager
  /** The gateways' connection (account GATEWAYS). */
  let devices: NatsConnection
  /** A device's own connection (account DEVICES). */
  let deviceNc: NatsConnection
  let mosquittoPub: string
  const procs = new Map<string, CliProcess>()
  /** Checkpoints moved back because the stream no longer held what was applied (killed processes'). */
  let rewinds = 0
  const rewindsIn = (p: CliProcess) =>
    p.output().split('the stream no longer holds what was applied').length - 1

  beforeAll(async () => {
    // The compose topology: three nodes from infra/nats/cluster-node.conf, every client in
    // its role (set-up as admin, processors as processor, gateways as device).
    const bin = await findOnPath('mosquitto_pub')
    if (bin === undefined) throw new HarnessError('mosquitto_pub not found on PATH')
    mosquittoPub = bin
    cluster = await startNatsCluster({
      devices: [{ id: NATS_DEVICE }, { id: MQTT_DEVICE, mqtt: true }],
    })
    postgres = await startPostgres()
    env = testEnv(cluster.url, await postgres.createDatabase(), {
      FLEET_STREAM_REPLICAS: '3',
      FLEET_DUPLICATE_WINDOW_SECONDS: '2',
      ALERT_RULES_FILE: await rulesFile(),
      PROCESSOR_BATCH_SIZE: '200',
    })
    const setup = await runCli(['setup'], { ...env, ...cluster.env('admin') })
    expect(setup.code, setup.output).toBe(0)
    const reconnecting = { maxReconnectAttempts: -1, reconnectTimeWait: 250 }
    nc = await cluster.connect('admin', reconnecting)
    devices = await cluster.connect('gateway', reconnecting)
    deviceNc = await cluster.connectDevice(NATS_DEVICE, reconnecting)
    jsm = await jetstreamManager(nc)
    env = { ...env, ...cluster.env('processor') }
    for (const name of PROCESSOR_NAMES) procs.set(name, spawnCli(['run', name, '--no-clock'], env))
  }, 120_000)

  afterAll(async () => {
    for (const p of procs.values()) p.child.kill('SIGKILL')
    await devices.close()
    await deviceNc.close()
    await nc.close()
    await postgres.cleanup()
    await cluster.cleanup()
  })

  it(
    'loses nothing, applies nothing twice, and parks each hostile or skewed copy exactly once',
    async () => {
      const gateways = [-300, 0, 300].map((skew, i) =>
        createPublisher(jetstream(devices), {
          clock: new HybridLogicalClock({
            node: `gw-${i}`,
            maxOffsetMs: 500,
            physicalNow: () => Date.now() + skew,
          }),
          timeoutMs: 2000,
        }),
      )
      // A gateway whose clock is 5 s ahead: everything it stamps is beyond max offset.
      const rogue = createPublisher(jetstream(devices), {
        clock: new HybridLogicalClock({
          node: 'rogue',
          maxOffsetMs: 60_000,
          physicalNow: () => Date.now() + 5000,
        }),
        timeoutMs: 2000,
      })
      const driver = new Driver(devices)
      // The device with a credential of its own publishes its own id only; MQTT events are
      // stamped here and sent by mosquitto_pub.
      const own = (node: string, nc: NatsConnection) =>
        createPublisher(jetstream(nc), {
          clock: new HybridLogicalClock({ node, maxOffsetMs: 500 }),
          timeoutMs: 2000,
        })
      const devicePublisher = own(NATS_DEVICE, deviceNc)
      const mqttStamper = own(MQTT_DEVICE, devices)
      let rnd = 7
      const random = () => (rnd = (rnd * 16807) % 2147483647) / 2147483647
      const device = () => `chaos-${Math.floor(random() * DEVICES)}`
      const draft = (deviceId: string) =>
        random() < 0.85
          ? ({
              type: 'reading.recorded',
              deviceId,
              data: {
                metric: random() < 0.5 ? 'temperature' : 'humidity',
                value: Math.round(random() * 500) / 10,
                unit: 'C',
              },
            } as const)
          : ({
              type: 'heartbeat.received',
              deviceId,
              data: { batteryPercent: Math.round(random() * 100) },
            } as const)

      driver.send(
        devicePublisher,
        devicePublisher.stamp({
          type: 'sensor.registered',
          deviceId: NATS_DEVICE,
          data: { site: 'site-own', model: 'm', firmware: '1' },
        }),
      )
      for (let i = 0; i < DEVICES; i++) {
        driver.send(
          gateways[i % 3]!,
          gateways[i % 3]!.stamp({
            type: 'sensor.registered',
            deviceId: `chaos-${i}`,
            data: { site: `site-${i % 7}`, model: 'm', firmware: '1' },
          }),
        )
      }

      const faults: Fault[] = []
      const started = Date.now()
      const endAt = started + SECONDS * 1000
      const held: { event: FleetEvent; gw: Publisher; at: number }[] = []
      const sentLog: FleetEvent[] = []

      // Publisher: steady rate, with duplicates in and out of the dedup window, late arrivals,
      // skewed clocks and poison, going on through every fault.
      const publishing = (async () => {
        let emitted = 0
        let oversize = 0
        while (Date.now() < endAt) {
          // Twice a run, messages FLEET_EVENTS stores whole but whose full copy FLEET_DLQ would not.
          if (
            oversize < 2 &&
            Date.now() > started + (oversize === 0 ? 0.3 : 0.7) * SECONDS * 1000
          ) {
            oversize++
            const wide = headers()
            for (let i = 0; i < 1200; i++) wide.append('Nats-X', 'y')
            driver.raw(
              `fleet.events.${device()}.reading`,
              'not json',
              `oversize-wide-${oversize}`,
              {
                headers: wide,
                kind: 'oversize',
              },
            )
            const some = headers()
            for (let i = 0; i < 60; i++) some.append(`Nats-Y-${i}`, 'v')
            driver.raw(
              `fleet.events.${device()}.reading`,
              'x'.repeat(MAX_MSG_BYTES - 1400),
              `oversize-big-${oversize}`,
              { headers: some, kind: 'oversize' },
            )
          }
          const due = Math.floor(((Date.now() - started) / 1000) * RATE)
          while (emitted < due) {
            emitted++
            const gw = gateways[emitted % 3]!
            const roll = random()
            if (roll < 0.003) {
              const h = headers()
              h.set(Headers.Hlc, encodeHlc({ wallMs: Date.now(), logical: 0, node: 'poison' }))
              if (emitted % 2 === 0) {
                // Headers that name a message id, hoping to change how the DLQ deduplicates.
                h.set('X-Nats-Msg-Id', 'same')
                h.set('Fleet-Dlq-Original-Nats-Msg-Id', 'same')
              }
              driver.raw(
                `fleet.events.${device()}.reading`,
                `{"eventId": "poison-${emitted}", "type": "reading.deleted"`,
                `poison-${emitted}`,
                { headers: h, kind: 'poison' },
              )
            } else if (roll < 0.006) {
              driver.send(rogue, rogue.stamp(draft(device())), 'skewed')
            } else if (roll < 0.0075) {
              // What the schema once took and Postgres refuses: U+0000 in text, year 0000, +23:00.
              const e = pgRefused(gw, device(), emitted)
              driver.raw(eventSubject(e.deviceId, e.type), JSON.stringify(e), e.eventId, {
                headers: eventHeaders(e),
                kind: 'pg-refused',
              })
            } else if (roll < 0.0095) {
              // A valid event with the header a redrive once carried: applied by all as usual.
              const e = gw.stamp(draft(device()))
              const h = eventHeaders(e)
              h.set('Fleet-Redrive-For', emitted % 2 === 0 ? 'nobody' : 'readings')
              h.set('Fleet-Redrive-Of', '1')
              driver.raw(eventSubject(e.deviceId, e.type), JSON.stringify(e), e.eventId, {
                headers: h,
                kind: 'valid',
                event: e,
              })
              driver.redriveHeaders++
            } else if (roll < 0.036) {
              const e = gw.stamp(draft(device()))
              held.push({ event: e, gw, at: Date.now() + 1000 + random() * 1000 }) // arrives late
            } else {
              const e = gw.stamp(draft(device()))
              driver.send(gw, e)
              sentLog.push(e)
              if (roll < 0.066)
                driver.send(gw, e) // duplicate inside the window
              else if (roll < 0.086 && sentLog.length > RATE * 4) {
                driver.send(gw, sentLog[sentLog.length - RATE * 4]!) // ~4 s old: outside the 2 s window
              }
            }
          }
          for (let i = held.length - 1; i >= 0; i--) {
            const h = held[i]!
            if (h.at <= Date.now()) {
              driver.send(h.gw, h.event)
              held.splice(i, 1)
            }
          }
          await driver.room()
          await new Promise((r) => setTimeout(r, 10))
        }
        for (const h of held) driver.send(h.gw, h.event)
      })()

      // A device of its own and the gateway name FLEET's JetStream API and DLQ as reply subjects;
      // an MQTT device publishes with QoS 1. One at a time, paused while a NATS node is down: a
      // PUBACK on nats-server 2.9 says that MQTT's own stream stored the message, not that
      // FLEET_EVENTS did (README, "What an MQTT PUBACK means"), and a stream without a leader
      // drops it.
      const natsFault = { down: false }
      let deviceStep: Promise<unknown> = Promise.resolve()
      let mqttNode = 0
      const mqtt = cluster.devices[MQTT_DEVICE]!
      const mqttPublish = async (topic: string, body: string) => {
        for (;;) {
          while (natsFault.down) await new Promise((r) => setTimeout(r, 200))
          const port = cluster.ports[mqttNode % cluster.ports.length]!.mqtt
          const r = await run(
            mosquittoPub,
            [
              ...['-h', '127.0.0.1', '-p', String(port), '-q', '1'],
              ...['-i', mqtt.mqttClientId ?? mqtt.user, '-u', mqtt.user, '-P', mqtt.password],
              ...['-t', topic, '-m', body],
            ],
            { cwd: repoRoot, timeoutMs: 15_000 },
          )
          if (r.code === 0) return
          driver.mqttRetries++
          mqttNode++
          await new Promise((r) => setTimeout(r, 500))
        }
      }
      const mqttSend = async (e: FleetEvent) => {
        await mqttPublish(eventSubject(e.deviceId, e.type).replaceAll('.', '/'), JSON.stringify(e))
        driver.accepted.set(e.eventId, e)
        driver.mqttAcked++
      }
      const inject = async (k: number) => {
        const viaGateway = k % 2 === 1
        const conn = viaGateway ? devices : deviceNc
        const e = viaGateway
          ? gateways[0]!.stamp(draft(device()))
          : devicePublisher.stamp(draft(NATS_DEVICE))
        const h = eventHeaders(e)
        h.set('Nats-Msg-Id', e.eventId)
        conn.publish(eventSubject(e.deviceId, e.type), JSON.stringify(e), {
          reply: INJECTED_REPLIES[Math.floor(k / 2) % INJECTED_REPLIES.length]!,
          headers: h,
        })
        await conn.flush().catch(() => undefined)
        // The same event again as a device that wants its PubAck: stored once (same id).
        await retrying(() =>
          jetstream(conn).publish(eventSubject(e.deviceId, e.type), JSON.stringify(e), {
            msgID: e.eventId,
            headers: eventHeaders(e),
            timeout: 2000,
          }),
        )
        driver.accepted.set(e.eventId, e)
        driver.injected++
      }
      const deviceLoop = (async () => {
        await mqttSend(
          mqttStamper.stamp({
            type: 'sensor.registered',
            deviceId: MQTT_DEVICE,
            data: { site: 'site-mqtt', model: 'm', firmware: '1' },
          }),
        )
        // A payload that is not an event, without a message id: parked by its stream sequence.
        await mqttPublish(`fleet/events/${MQTT_DEVICE}/reading`, '{"temperature": 21')
        driver.mqttPoison++
        for (let k = 0; Date.now() < endAt; k++) {
          while (natsFault.down) await new Promise((r) => setTimeout(r, 200))
          deviceStep = k % 2 === 0 ? mqttSend(mqttStamper.stamp(draft(MQTT_DEVICE))) : inject(k)
          await deviceStep
          await new Promise((r) => setTimeout(r, 100))
        }
      })()

      // Faults, one after another, while the fleet publishes.
      const chaos = (async () => {
        const plan = [0.12, 0.25, 0.38, 0.62, 0.75, 0.88]
        const pgAt = 0.45
        const natsAt = 0.55
        const at = (f: number) => started + f * SECONDS * 1000
        const waitUntil = (t: number) =>
          new Promise((r) => setTimeout(r, Math.max(0, t - Date.now())))
        const steps = [
          ...plan.map((f) => ({
            t: at(f),
            run: () => killProcessor(PROCESSOR_NAMES[Math.floor(random() * 3)]!),
          })),
          // With a long outage, that one is Postgres's (beside the other faults, below).
          ...(LONG_OUTAGE_MS > 0 ? [] : [{ t: at(pgAt), run: () => stopPostgres(OUTAGE_MS) }]),
          { t: at(natsAt), run: () => killStreamLeader() },
        ].sort((a, b) => a.t - b.t)
        const done = (f: Fault) => {
          log(`fault: ${f.kind}, service back after ${(f.restoredAt - f.at) / 1000} s`)
          faults.push(f)
        }
        // Longer than the DLQ's old duplicate window: what was parked before it and is parked
        // again after it must still be one entry each. Processors are killed and the stream
        // leader too while Postgres is down.
        const long =
          LONG_OUTAGE_MS > 0
            ? waitUntil(at(0.1)).then(async () => {
                log(`fault: PostgreSQL down for ${LONG_OUTAGE_MS / 1000} s, starting`)
                done(await stopPostgres(LONG_OUTAGE_MS))
              })
            : Promise.resolve()
        for (const s of steps) {
          await waitUntil(s.t)
          done(await s.run())
        }
        await long
      })()
      chaos.catch(() => undefined) // awaited below; not an unhandled rejection meanwhile

      const killProcessor = async (name: string): Promise<Fault> => {
        const f: Fault = { kind: `SIGKILL ${name}`, at: Date.now(), restoredAt: 0, recoveredAt: 0 }
        const p = procs.get(name)!
        p.child.kill('SIGKILL')
        await p.exited
        rewinds += rewindsIn(p)
        await new Promise((r) => setTimeout(r, 300 + random() * 1200))
        procs.set(name, spawnCli(['run', name, '--no-clock'], env))
        f.restoredAt = Date.now()
        void recovered(f)
        return f
      }
      const stopPostgres = async (ms: number): Promise<Fault> => {
        const f: Fault = {
          kind: `PostgreSQL down ${ms / 1000} s`,
          at: Date.now(),
          restoredAt: 0,
          recoveredAt: 0,
        }
        if (ms === LONG_OUTAGE_MS) {
          // A storm of poison as Postgres goes down: the processors park what is in hand, then
          // cannot commit past it, and park it again when Postgres is back, after the old
          // two-minute DLQ window. (Without the storm the batch in hand rarely holds poison.)
          for (let i = 0; i < 20; i++) {
            setTimeout(() => {
              for (let j = 0; j < 20; j++) {
                const id = `storm-${i}-${j}`
                const h = headers()
                h.set(Headers.Hlc, encodeHlc({ wallMs: Date.now(), logical: 0, node: 'poison' }))
                driver.raw(`fleet.events.${device()}.reading`, `{"eventId": "${id}"`, id, {
                  headers: h,
                  kind: 'poison',
                })
              }
            }, i * 50)
          }
          await new Promise((r) => setTimeout(r, 500))
        }
        await postgres.stop('immediate')
        await new Promise((r) => setTimeout(r, ms))
        await postgres.start()
        f.restoredAt = Date.now()
        void recovered(f)
        return f
      }
      const killStreamLeader = async (): Promise<Fault> => {
        // The test's own admin calls ride out a slow cluster like the processors do.
        const leader =
          (await retrying(() => jsm.streams.info('FLEET_EVENTS'))).cluster?.leader ?? ''
        const node = cluster.servers[cluster.names.indexOf(leader)] ?? cluster.servers[0]!
        natsFault.down = true
        await deviceStep.catch(() => undefined)
        const f: Fault = {
          kind: `NATS stream leader ${leader} killed ${OUTAGE_MS / 1000} s`,
          at: Date.now(),
          restoredAt: 0,
          recoveredAt: 0,
        }
        await node.kill('SIGKILL')
        await new Promise((r) => setTimeout(r, OUTAGE_MS))
        await node.restart()
        f.restoredAt = Date.now()
        void recovered(f).finally(() => (natsFault.down = false))
        return f
      }
      /** Every processor has caught up with the stream as it stood when the fault ended. */
      const recovered = async (f: Fault) => {
        const target = await retrying(
          async () => (await jsm.streams.info('FLEET_EVENTS')).state.last_seq,
        )
        const within = 120_000 + LONG_OUTAGE_MS
        await waitFor(`recovery from ${f.kind}`, () => caughtUpTo(target), within).then(
          () => (f.recoveredAt = Date.now()),
          () => (f.recoveredAt = -1), // reported, and failed below
        )
        log(
          `recovered from ${f.kind}: ${f.recoveredAt < 0 ? `NOT within ${within / 1000} s` : `${(f.recoveredAt - f.restoredAt) / 1000} s`}`,
        )
      }
      const caughtUpTo = async (target: number) => {
        try {
          const infos = await Promise.all(
            PROCESSOR_NAMES.map((n) => jsm.consumers.info('FLEET_EVENTS', n)),
          )
          return infos.every(
            (i) =>
              i.ack_floor.stream_seq >= target || (i.num_pending === 0 && i.num_ack_pending === 0),
          )
        } catch {
          return false // a node restarting, a consumer being re-anchored
        }
      }

      await publishing
      await deviceLoop
      log(
        `published for ${SECONDS} s: ${driver.attempts} publishes, ${driver.retries} retries so far`,
      )
      await chaos
      for (const [name, p] of procs) {
        expect(p.child.exitCode, `${name} died on its own:\n${p.output().slice(-3000)}`).toBeNull()
      }
      await driver.drain()
      // A device that knows the last message id makes the server check it on a poison event;
      // its DLQ copies must not carry that check along. Nothing else publishes now.
      const before = gateways[0]!.stamp(draft(device()))
      await retrying(() => gateways[0]!.publishEvent(before))
      driver.accepted.set(before.eventId, before)
      const expecting = headers()
      expecting.set(Headers.Hlc, encodeHlc({ wallMs: Date.now(), logical: 0, node: 'poison' }))
      expecting.set('Nats-Expected-Last-Msg-Id', before.eventId)
      await retrying(() =>
        jetstream(devices).publish(`fleet.events.${device()}.reading`, 'not json, expecting', {
          msgID: 'poison-expecting-last',
          headers: expecting,
          timeout: 2000,
        }),
      )
      driver.poisonIds.set('poison-expecting-last', 'poison')
      log('every publish acknowledged')
      // Publishes that timed out during the leader kill may still be stored after their retries
      // were acknowledged: wait until the stream stands still before taking its measure.
      let last = -1
      for (;;) {
        const now = (await retrying(() => jsm.streams.info('FLEET_EVENTS'))).state.last_seq
        if (now === last) break
        last = now
        await new Promise((r) => setTimeout(r, 3000))
      }
      log(`stream still at ${last}`)
      await waitFor(
        'every processor to catch up with the whole stream',
        () => caughtUpTo(last),
        180_000,
        () => [...procs.entries()].map(([n, p]) => `${n}: ${p.output().slice(-2000)}`).join('\n'),
      )
      await waitFor(
        'every fault to be recovered from',
        () => faults.every((f) => f.recoveredAt !== 0),
        130_000 + LONG_OUTAGE_MS,
      )

      // The oracle: what the stream acknowledged, and what should therefore be in the read models.
      const client = new pg.Client(env.DATABASE_URL)
      await client.connect()
      const q = async <T extends pg.QueryResultRow>(sql: string) =>
        (await client.query<T>(sql)).rows
      // The final stream, by message id (an MQTT message has none: by its eventId, or if it is
      // not an event, by the DLQ key of its sequence): how far ahead of its store time each
      // copy's HLC was.
      const stored = new Map<
        string,
        { subject: string; copies: number; minAheadMs: number; maxAheadMs: number }
      >()
      const mqttPoisonKeys = new Set<string>()
      await scanStream(nc, last, (seq, subject, msgId, hlc, storedMs, data) => {
        const ahead = hlc === '' ? 0 : decodeHlc(hlc).wallMs - storedMs
        let id = msgId
        if (id === '') {
          id = eventIdIn(data) ?? `FLEET_EVENTS:${seq}`
          if (id === `FLEET_EVENTS:${seq}`) mqttPoisonKeys.add(id)
        }
        const had = stored.get(id)
        stored.set(id, {
          subject,
          copies: (had?.copies ?? 0) + 1,
          minAheadMs: Math.min(had?.minAheadMs ?? Infinity, ahead),
          maxAheadMs: Math.max(had?.maxAheadMs ?? -Infinity, ahead),
        })
      })
      // A rogue event with a copy stored while within max offset is valid input: that copy is
      // applied (a re-send delayed by retries past the dedup window; its other copies are parked).
      for (const e of driver.skewedIds.values()) {
        if ((stored.get(e.eventId)?.minAheadMs ?? Infinity) <= 500)
          driver.accepted.set(e.eventId, e)
      }
      const accepted = [...driver.accepted.values()]
      const readings = accepted.filter((e) => e.type === 'reading.recorded')
      const readingIds = new Set(
        (await q<{ event_id: string }>('select event_id from readings')).map((r) => r.event_id),
      )
      const lost = readings.filter((e) => !readingIds.has(e.eventId)).length
      const unexpected = [...readingIds].filter((id) => !driver.accepted.has(id)).length
      const [totals] = await q<{ rows: string; rolled: string }>(
        'select (select count(*) from readings) as rows, (select coalesce(sum(count), 0) from readings_per_minute) as rolled',
      )
      const appliedTwice = Number(totals!.rolled) - Number(totals!.rows)

      const latest = new Map<string, string>()
      const seen = new Map<string, string>()
      for (const e of accepted) {
        if (e.type === 'reading.recorded') {
          const k = `${e.deviceId}/${e.data.metric}`
          if ((latest.get(k) ?? '') < e.hlc) latest.set(k, e.hlc)
        }
        if ((seen.get(e.deviceId) ?? '') < e.hlc) seen.set(e.deviceId, e.hlc)
      }
      const latestRows = await q<{ device_id: string; metric: string; hlc: string }>(
        'select device_id, metric, hlc from latest_readings',
      )
      const wrongLatest =
        latestRows.filter((r) => latest.get(`${r.device_id}/${r.metric}`) !== r.hlc).length +
        (latest.size - latestRows.length)
      const statusRows = await q<{ device_id: string; last_seen_hlc: string; status: string }>(
        'select device_id, last_seen_hlc, status from sensor_status',
      )
      const wrongStatus =
        statusRows.filter((r) => seen.get(r.device_id) !== r.last_seen_hlc || r.status !== 'active')
          .length +
        (seen.size - statusRows.length)
      await client.end()

      // DLQ: each processor that reads an event's kind parks each stored poison event (bad JSON,
      // what Postgres would refuse, oversize, an MQTT payload that is not an event) once, and
      // each rogue event that was still beyond max offset when the stream stored it (one delayed
      // by retries through an outage may no longer be, and is then rightly applied). Entries are
      // counted per (processor, Fleet-Dlq-Key): the original's Nats-Msg-Id, or its stream and
      // sequence when it had none.
      const expectedDlq = new Set<string>()
      const storedByKind: Record<string, number> = {}
      for (const [id, m] of stored) {
        const kind = mqttPoisonKeys.has(id)
          ? 'mqtt-poison'
          : (driver.poisonIds.get(id) ??
            (driver.skewedIds.has(id) && m.maxAheadMs > 500 ? 'skewed' : undefined))
        if (kind === undefined) continue
        storedByKind[kind] = (storedByKind[kind] ?? 0) + 1
        for (const n of readersOf(m.subject)) expectedDlq.add(`${n} ${id}`)
      }
      const dlqInfo = await retrying(() => jsm.streams.info('FLEET_DLQ'))
      const dlqCounts = new Map<string, number>()
      let dlqEntries = 0
      let seqMoved = 0
      const why = new Map<string, string>()
      for (
        let seq = dlqInfo.state.first_seq;
        seq <= dlqInfo.state.last_seq && dlqInfo.state.messages > 0;
        seq++
      ) {
        const m = await retrying(() => jsm.streams.getMessage('FLEET_DLQ', { seq }))
        if (!m) continue
        const dlqKey = m.header.get(Headers.DlqKey)
        const key = `${m.header.get(Headers.DlqProcessor)} ${dlqKey}`
        dlqEntries++
        dlqCounts.set(key, (dlqCounts.get(key) ?? 0) + 1)
        // Does the stream still hold this event at the sequence the processor saw it at?
        const seqNow = Number(m.header.get(Headers.DlqStreamSeq))
        const there = await jsm.streams
          .getMessage('FLEET_EVENTS', { seq: seqNow })
          .catch(() => null)
        const keyThere = there
          ? there.header.get('Nats-Msg-Id') || `FLEET_EVENTS:${seqNow}`
          : undefined
        if (keyThere !== dlqKey) {
          seqMoved++
          if (seqMoved <= 3)
            log(
              `DLQ entry ${seq} (${key}) names stream seq ${seqNow}, which now holds ${there ? `'${there.header.get('Nats-Msg-Id')}' on ${there.subject}` : 'nothing'}`,
            )
        }
        why.set(
          key,
          `${m.header.get(Headers.DlqReason)}: ${m.header.get(Headers.DlqDetail)} (stream seq ${m.header.get(Headers.DlqStreamSeq)}, subject ${m.header.get(Headers.DlqSubject)})`,
        )
      }
      const dlqUnexpected = [...dlqCounts.keys()].filter((k) => !expectedDlq.has(k))
      const dlqNotOnce = [...expectedDlq]
        .filter((k) => dlqCounts.get(k) !== 1)
        .map((k) => `${k} x${dlqCounts.get(k) ?? 0}`)
      for (const k of dlqUnexpected.slice(0, 10))
        log(`parked but not poison or skewed: ${k}: ${why.get(k) ?? ''}`)
      for (const k of dlqNotOnce.slice(0, 10)) log(`expected once in the DLQ: ${k}`)
      // Reply subjects named by devices purged, deleted or forged nothing: the streams hold every
      // message they ever stored, and the DLQ only the expected entries (counted above).
      const untouched = async (name: string) => {
        const st = (await retrying(() => jsm.streams.info(name))).state
        return {
          messages: st.messages,
          firstSeq: st.first_seq,
          lastSeq: st.last_seq,
          // nats-server leaves num_deleted out when it is 0.
          deleted: st.num_deleted || 0,
        }
      }
      const notifications = await untouched('FLEET_NOTIFICATIONS')
      const dlqState = await untouched('FLEET_DLQ')
      // Acknowledged by the stream, yet not in it at the end: the server would have lost them.
      const acked = [
        ...driver.accepted.keys(),
        ...driver.poisonIds.keys(),
        ...driver.skewedIds.keys(),
      ]
      const missingFromStream = acked.filter((id) => !stored.has(id))
      if (missingFromStream.length > 0) {
        const info = await retrying(() => jsm.streams.info('FLEET_EVENTS'))
        log(
          `acknowledged but not in the stream: ${missingFromStream.length}, e.g. ${missingFromStream.slice(0, 3).join(', ')}; stream ${JSON.stringify(info.state)}, cluster ${JSON.stringify(info.cluster)}`,
        )
      }

      const figures = {
        seconds: SECONDS,
        published: driver.attempts,
        accepted: driver.accepted.size + driver.poisonIds.size + driver.skewedIds.size,
        hostileStored: storedByKind,
        validWithRedriveHeaders: driver.redriveHeaders,
        injectedReplies: driver.injected,
        mqttAcked: driver.mqttAcked,
        mqttPoison: driver.mqttPoison,
        mqttRetries: driver.mqttRetries,
        duplicatesRefusedByStream: driver.duplicates,
        publishRetries: driver.retries,
        streamMessages: last,
        ackedButMissingFromStream: missingFromStream.length,
        readingsAccepted: readings.length,
        readingsInReadModel: readingIds.size,
        lost,
        unexpected,
        appliedTwice,
        wrongLatest,
        wrongStatus,
        dlqExpected: expectedDlq.size,
        dlqEntries,
        dlqKeysNotOnce: dlqNotOnce.length,
        dlqUnexpected: dlqUnexpected.length,
        notifications,
        dlqStream: dlqState,
        dlqEntriesWhoseSequenceNowHoldsAnotherEvent: seqMoved,
        checkpointRewinds: rewinds + [...procs.values()].reduce((n, p) => n + rewindsIn(p), 0),
        faults: faults.map((f) => ({
          fault: f.kind,
          restoredAfterS: +((f.restoredAt - f.at) / 1000).toFixed(1),
          recoveredAfterS: +((f.recoveredAt - f.restoredAt) / 1000).toFixed(1),
        })),
      }
      console.log(`chaos figures\n${JSON.stringify(figures, null, 2)}`)
      if (process.env.CHAOS_REPORT)
        await writeFile(process.env.CHAOS_REPORT, JSON.stringify(figures, null, 2))

      expect(faults.filter((f) => f.recoveredAt < 0).map((f) => f.kind)).toEqual([])
      expect(faults.map((f) => f.kind.split(' ')[0])).toEqual(
        expect.arrayContaining(['SIGKILL', 'PostgreSQL', 'NATS']),
      )
      expect(driver.duplicates).toBeGreaterThan(0)
      expect(readings.length).toBeGreaterThan(SECONDS * RATE * 0.3)
      expect({
        ackedButMissingFromStream: missingFromStream.length,
        lost,
        unexpected,
        appliedTwice,
        wrongLatest,
        wrongStatus,
      }).toEqual({
        ackedButMissingFromStream: 0,
        lost: 0,
        unexpected: 0,
        appliedTwice: 0,
        wrongLatest: 0,
        wrongStatus: 0,
      })
      expect({
        dlqNotOnce: dlqNotOnce.slice(0, 20),
        dlqUnexpected: dlqUnexpected.slice(0, 20),
        dlqEntries,
      }).toEqual({ dlqNotOnce: [], dlqUnexpected: [], dlqEntries: expectedDlq.size })
      for (const kind of ['poison', 'pg-refused', 'oversize', 'mqtt-poison'])
        expect(storedByKind[kind] ?? 0, kind).toBeGreaterThan(0)
      expect(driver.redriveHeaders).toBeGreaterThan(0)
      expect(driver.injected).toBeGreaterThanOrEqual(INJECTED_REPLIES.length * 2)
      expect(driver.mqttAcked).toBeGreaterThan(1)
      for (const st of [notifications, dlqState]) {
        expect(st.deleted).toBe(0)
        expect(st.firstSeq).toBeLessThanOrEqual(1)
        expect(st.messages).toBe(st.lastSeq)
      }
      expect(dlqState.messages).toBe(expectedDlq.size)
      for (const p of procs.values()) p.child.kill('SIGTERM')
      expect(await Promise.all([...procs.values()].map((p) => p.exited))).toEqual([0, 0, 0])
    },
    (SECONDS + 420) * 1000,
  )
})

/**
 * Publishes as a gateway with at-least-once delivery does: a publish that fails is tried again
 * later with the same msg id until the stream acknowledges it; only acknowledged events count.
 */
class Driver {
  readonly accepted = new Map<string, FleetEvent>()
  readonly skewedIds = new Map<string, FleetEvent>()
  /** Hostile messages the stream acknowledged, by message id: what kind of hostile. */
  readonly poisonIds = new Map<string, string>()
  redriveHeaders = 0
  injected = 0
  mqttAcked = 0
  mqttPoison = 0
  mqttRetries = 0
  attempts = 0
  duplicates = 0
  retries = 0
  readonly #inFlight = new Set<Promise<void>>()
  readonly #js

  constructor(nc: NatsConnection) {
    this.#js = jetstream(nc)
  }

  send(publisher: Publisher, e: FleetEvent, kind: 'valid' | 'skewed' = 'valid'): void {
    this.#track(async () => {
      const r = await publisher.publishEvent(e)
      if (r.duplicate) this.duplicates++
      if (kind === 'skewed') this.skewedIds.set(e.eventId, e)
      else this.accepted.set(e.eventId, e)
    })
  }

  /**
   * Publishes `body` as it is with message id `id`, past the publisher's validation (a hostile
   * device): a hostile `kind`, or a valid `event` with odd headers.
   */
  raw(
    subject: string,
    body: string,
    id: string,
    opts: { headers: MsgHdrs; kind: string; event?: FleetEvent },
  ): void {
    this.#track(async () => {
      const r = await this.#js.publish(subject, body, {
        msgID: id,
        headers: opts.headers,
        timeout: 2000,
      })
      if (r.duplicate) this.duplicates++
      if (opts.event !== undefined) this.accepted.set(id, opts.event)
      else this.poisonIds.set(id, opts.kind)
    })
  }

  /** Waits while the window of publishes in flight is full. */
  async room(): Promise<void> {
    while (this.#inFlight.size >= 256) await Promise.race(this.#inFlight)
  }

  async drain(): Promise<void> {
    while (this.#inFlight.size > 0) await Promise.all(this.#inFlight)
  }

  #track(attempt: () => Promise<void>): void {
    this.attempts++
    const run = async (): Promise<void> => {
      for (let i = 0; ; i++) {
        try {
          await attempt()
          return
        } catch {
          this.retries++
          await new Promise((r) =>
            setTimeout(r, Math.min(5000, 200 * 2 ** i) * (0.5 + Math.random())),
          )
        }
      }
    }
    const p: Promise<void> = run().finally(() => this.#inFlight.delete(p))
    this.#inFlight.add(p)
  }
}

/**
 * Reads the whole stream by sequence from the stream leader. (An ordered consumer is ephemeral
 * and may be served by a replica still catching up after a restart: it once missed ~280 of the
 * newest messages here.)
 */
async function scanStream(
  nc: NatsConnection,
  last: number,
  each: (
    seq: number,
    subject: string,
    msgId: string,
    hlc: string,
    storedMs: number,
    data: Uint8Array,
  ) => void,
): Promise<void> {
  const jsm = await jetstreamManager(nc)
  for (let from = 1; from <= last; from += 64) {
    const seqs = Array.from({ length: Math.min(64, last - from + 1) }, (_, k) => from + k)
    const msgs = await Promise.all(
      seqs.map((seq) => retrying(() => jsm.streams.getMessage('FLEET_EVENTS', { seq }))),
    )
    for (const m of msgs) {
      if (m === null) continue
      each(
        m.seq,
        m.subject,
        m.header.get('Nats-Msg-Id'),
        m.header.get(Headers.Hlc),
        m.time.getTime(),
        m.data,
      )
    }
  }
}

/** The eventId of a message body that is a JSON object with one, else undefined. */
function eventIdIn(data: Uint8Array): string | undefined {
  try {
    const v: unknown = JSON.parse(new TextDecoder().decode(data))
    const id = (v as { eventId?: unknown } | null)?.eventId
    return typeof id === 'string' ? id : undefined
  } catch {
    return undefined
  }
}

/**
 * An event the schema once accepted and Postgres refuses (issue 12, item 2), now refused when
 * decoded: U+0000 in a status reason, an occurredAt in year 0000, or one with a +23:00 offset.
 */
function pgRefused(gw: Publisher, deviceId: string, k: number): FleetEvent {
  if (k % 3 === 0) {
    const e = gw.stamp({
      type: 'status.changed',
      deviceId,
      data: { status: 'maintenance', reason: 'x' },
    })
    return { ...e, data: { status: 'maintenance', reason: `bad\u0000${k}` } }
  }
  const e = gw.stamp({
    type: 'reading.recorded',
    deviceId,
    data: { metric: 'temperature', value: 20, unit: 'C' },
  })
  return {
    ...e,
    occurredAt: k % 3 === 1 ? '0000-06-01T00:00:00.000Z' : '2026-06-01T12:00:00.000+23:00',
  }
}

async function retrying<T>(f: () => Promise<T>): Promise<T> {
  for (let i = 0; ; i++) {
    try {
      return await f()
    } catch (err) {
      if (i > 100) throw err
      await new Promise((r) => setTimeout(r, 250))
    }
  }
}
