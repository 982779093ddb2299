import { writeFile } from 'node:fs/promises'
import { jetstream, jetstreamManager, type JetStreamManager } from '@nats-io/jetstream'
import { headers, type NatsConnection } from '@nats-io/transport-node'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { createPublisher, type Publisher } from '../infra/publisher.ts'
import { PROCESSOR_NAMES } from '../processors/index.ts'
import type { FleetEvent } from '../schemas/events.ts'
import { decodeHlc, encodeHlc, HybridLogicalClock } from '../schemas/hlc.ts'
import { Headers } from '../schemas/subjects.ts'
import {
  startNatsCluster,
  startPostgres,
  type NatsCluster,
  type PgCluster,
} from './harness/index.ts'
import { rulesFile, runCli, spawnCli, testEnv, waitFor, type CliProcess } from './fixtures.ts'

/**
 * A fleet through real failures, checked against an oracle computed from the publisher's own
 * record of what the stream acknowledged. CHAOS_SECONDS and CHAOS_RATE scale it: the CI run is
 * short; `npm run chaos` runs the long one. CHAOS_REPORT names a JSON file for the figures.
 */
const SECONDS = Number(process.env.CHAOS_SECONDS ?? 30)
const RATE = Number(process.env.CHAOS_RATE ?? 500)
const DEVICES = 200
const OUTAGE_MS = Number(process.env.CHAOS_OUTAGE_MS ?? 4000)

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
  /** The gateways' connection (device role). */
  let devices: NatsConnection
  const procs = new Map<string, CliProcess>()
  /** Checkpoints moved back because the stream no longer held what was applied (killed processes'). */
  let rewinds = 0
  const rewindsIn = (p: CliProcess) =>
    p.output().split('the stream no longer holds what was applied').length - 1

  beforeAll(async () => {
    // The compose topology: three nodes from infra/nats/cluster-node.conf, every client in
    // its role (set-up as admin, processors as processor, gateways as device).
    cluster = await startNatsCluster()
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
    jsm = await jetstreamManager(nc)
    env = { ...env, ...cluster.env('processor') }
    for (const name of PROCESSOR_NAMES) procs.set(name, spawnCli(['run', name, '--no-clock'], env))
  }, 120_000)

  afterAll(async () => {
    for (const p of procs.values()) p.child.kill('SIGKILL')
    await devices.close()
    await nc.close()
    await postgres.cleanup()
    await cluster.cleanup()
  })

  it(
    'loses nothing, applies nothing twice, and parks exactly the poison and the skewed',
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
        while (Date.now() < endAt) {
          const due = Math.floor(((Date.now() - started) / 1000) * RATE)
          while (emitted < due) {
            emitted++
            const gw = gateways[emitted % 3]!
            const roll = random()
            if (roll < 0.003) {
              driver.poison(`fleet.events.${device()}.reading`, `poison-${emitted}`)
            } else if (roll < 0.006) {
              driver.send(rogue, rogue.stamp(draft(device())), 'skewed')
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
          { t: at(pgAt), run: () => stopPostgres() },
          { t: at(natsAt), run: () => killStreamLeader() },
        ].sort((a, b) => a.t - b.t)
        for (const s of steps) {
          await waitUntil(s.t)
          const f = await s.run()
          log(`fault: ${f.kind}, service back after ${(f.restoredAt - f.at) / 1000} s`)
          faults.push(f)
        }
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
      const stopPostgres = async (): Promise<Fault> => {
        const f: Fault = {
          kind: `PostgreSQL down ${OUTAGE_MS / 1000} s`,
          at: Date.now(),
          restoredAt: 0,
          recoveredAt: 0,
        }
        await postgres.stop('immediate')
        await new Promise((r) => setTimeout(r, OUTAGE_MS))
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
        void recovered(f)
        return f
      }
      /** Every processor has caught up with the stream as it stood when the fault ended. */
      const recovered = async (f: Fault) => {
        const target = await retrying(
          async () => (await jsm.streams.info('FLEET_EVENTS')).state.last_seq,
        )
        await waitFor(`recovery from ${f.kind}`, () => caughtUpTo(target), 120_000).then(
          () => (f.recoveredAt = Date.now()),
          () => (f.recoveredAt = -1), // reported, and failed below
        )
        log(
          `recovered from ${f.kind}: ${f.recoveredAt < 0 ? 'NOT within 120 s' : `${(f.recoveredAt - f.restoredAt) / 1000} s`}`,
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
      log(
        `published for ${SECONDS} s: ${driver.attempts} publishes, ${driver.retries} retries so far`,
      )
      await chaos
      for (const [name, p] of procs) {
        expect(p.child.exitCode, `${name} died on its own:\n${p.output().slice(-3000)}`).toBeNull()
      }
      await driver.drain()
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
        130_000,
      )

      // The oracle: what the stream acknowledged, and what should therefore be in the read models.
      const client = new pg.Client(env.DATABASE_URL)
      await client.connect()
      const q = async <T extends pg.QueryResultRow>(sql: string) =>
        (await client.query<T>(sql)).rows
      // The final stream, by message id: how far ahead of its store time each copy's HLC was.
      const stored = new Map<
        string,
        { subject: string; copies: number; minAheadMs: number; maxAheadMs: number }
      >()
      await scanStream(nc, last, (_seq, subject, msgId, hlc, storedMs) => {
        const ahead = hlc === '' ? 0 : decodeHlc(hlc).wallMs - storedMs
        const had = stored.get(msgId)
        stored.set(msgId, {
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

      // DLQ: each processor whose filter matches parks each stored copy of a poison event, and of
      // a rogue event that was still beyond max offset when the stream stored it (one delayed by
      // retries through an outage may no longer be, and is then rightly applied).
      // Compared by identity (the original Nats-Msg-Id every DLQ entry keeps), not by sequence.
      const expectedDlq = new Set<string>()
      let skewed = 0
      let poison = 0
      for (const [msgId, m] of stored) {
        const isPoison = msgId.startsWith('poison-')
        const isSkewed = driver.skewedIds.has(msgId) && m.maxAheadMs > 500
        if (isPoison) poison++
        if (isSkewed) skewed++
        if (isPoison || isSkewed) {
          for (const n of PROCESSOR_NAMES) {
            if (n !== 'readings' || m.subject.endsWith('.reading')) expectedDlq.add(`${n} ${msgId}`)
          }
        }
      }
      const dlqInfo = await retrying(() => jsm.streams.info('FLEET_DLQ'))
      const parked = new Set<string>()
      let seqMoved = 0
      const why = new Map<string, string>()
      for (
        let seq = dlqInfo.state.first_seq;
        seq <= dlqInfo.state.last_seq && dlqInfo.state.messages > 0;
        seq++
      ) {
        const m = await retrying(() => jsm.streams.getMessage('FLEET_DLQ', { seq }))
        if (!m) continue
        const key = `${m.header.get(Headers.DlqProcessor)} ${m.header.get(Headers.DlqKey)}`
        parked.add(key)
        // Does the stream still hold this event at the sequence the processor saw it at?
        const seqNow = Number(m.header.get(Headers.DlqStreamSeq))
        const there = await jsm.streams
          .getMessage('FLEET_EVENTS', { seq: seqNow })
          .catch(() => null)
        if (there?.header.get('Nats-Msg-Id') !== m.header.get(Headers.DlqKey)) {
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
      for (const k of parked)
        if (!expectedDlq.has(k)) log(`parked but not poison or skewed: ${k}: ${why.get(k) ?? ''}`)
      // Acknowledged by the stream, yet not in it at the end: the server would have lost them.
      const acked = [...driver.accepted.keys(), ...driver.poisonIds, ...driver.skewedIds.keys()]
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
        poisonStored: poison,
        skewedStored: skewed,
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
        dlqParked: parked.size,
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
      expect([...parked].sort()).toEqual([...expectedDlq].sort())
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
  readonly poisonIds = new Set<string>()
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

  poison(subject: string, id: string): void {
    this.#track(async () => {
      const h = headers()
      h.set(Headers.Hlc, encodeHlc({ wallMs: Date.now(), logical: 0, node: 'poison' }))
      await this.#js.publish(subject, `{"eventId": "${id}", "type": "reading.deleted"`, {
        msgID: id,
        headers: h,
        timeout: 2000,
      })
      this.poisonIds.add(id)
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
  each: (seq: number, subject: string, msgId: string, hlc: string, storedMs: number) => void,
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
      )
    }
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
