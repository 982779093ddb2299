import { sql, type Kysely } from 'kysely'
import type pg from 'pg'
import { afterAll, describe, expect, it } from 'vitest'
import { onOneConnection } from '../processors/admin/copy-in.ts'
import { createKysely, createPool } from '../infra/database.ts'
import { createLogger } from '../infra/logger.ts'
import { parseAlertRules } from '../projections/alert-rules.ts'
import { alertsProjection, type AlertsOptions } from '../projections/alerts.ts'
import { alertsBulkLoad } from '../projections/alerts-bulk-load.ts'
import { migrateToLatest } from '../projections/migrate.ts'
import { anyEvents, type AnyProjection, type ProjectedEvent } from '../projections/projection.ts'
import type { SensorBulkLoad } from '../projections/sensor-bulk-load.ts'
import { sensorStatusProjection } from '../projections/sensor-status.ts'
import { sensorStatusBulkLoad } from '../projections/sensor-status-bulk-load.ts'
import type { Database } from '../projections/tables.ts'
import type { FleetEvent } from '../schemas/events.ts'
import { SYSTEM_SOURCE } from '../schemas/envelope.ts'
import { encodeHlc } from '../schemas/hlc.ts'
import { TEMPERATURE_HIGH } from './fixtures.ts'
import { freshDatabase } from './harness/test-servers.ts'

/**
 * The bulk loads of sensor-status and alerts (a rebuild's bulk phase) against the projections'
 * own `apply`: every table equal, row for row and column for column, on a stream with
 * registrations, readings that raise and clear alerts, battery heartbeats, maintenance,
 * acknowledgements, events out of HLC order, duplicates within and across chunks, clock ticks
 * that silence sensors, and a bound of sensors that forces windows to be written mid-way.
 */
const ALERTS: AlertsOptions = {
  rules: parseAlertRules({
    rules: [
      TEMPERATURE_HIGH,
      { id: 'battery-low', kind: 'battery-low', below: 15, clear: 20, severity: 'warning' },
      { id: 'sensor-silent', kind: 'silent', severity: 'warning' },
    ],
  }),
  defaultTimeoutSeconds: 30,
  // A small window: folds prune their inputs to horizons within the stream.
  windowReadings: 4,
}
const STATUS = { defaultTimeoutSeconds: 30 }
const T0 = 1_795_000_000_000
const DEVICES = ['d-0', 'd-1', 'd-2', 'd-3', 'd-4', 'd-5']

/** A deterministic pseudo-random sequence (mulberry32). */
function random(seed: number): () => number {
  let a = seed
  return () => {
    a = (a + 0x6d2b79f5) | 0
    let t = Math.imul(a ^ (a >>> 15), 1 | a)
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

function envelope(n: number, deviceId: string, atMs: number) {
  const eventId = `e-${String(n).padStart(5, '0')}`
  return {
    eventId,
    deviceId,
    version: 1 as const,
    occurredAt: new Date(atMs).toISOString(),
    hlc: encodeHlc({ wallMs: atMs, logical: 0, node: 'gw' }),
    correlationId: `c-${eventId}`,
  }
}

/**
 * The stream, in stream order: each step one second later by HLC; some events swapped with their
 * neighbour (out of HLC order), some delivered again later; with `ticks`, a tick every 15 steps
 * (d-5 falls silent after its first events, d-1 has a timeout of its own).
 */
function stream(ticks: boolean, seed = 7): FleetEvent[] {
  const rnd = random(seed)
  const out: FleetEvent[] = []
  let n = 0
  for (const [i, d] of DEVICES.entries()) {
    out.push({
      ...envelope(++n, d, T0 + i * 100),
      type: 'sensor.registered',
      data: {
        site: 'site-1',
        model: 'm\tx',
        firmware: '1.0',
        ...(d === 'd-1' ? { inactivityTimeoutSeconds: 20 } : {}),
      },
    })
  }
  for (let k = 1; k <= 120; k++) {
    const at = T0 + k * 1000
    if (ticks && k % 15 === 0) {
      out.push({
        ...envelope(++n, SYSTEM_SOURCE, at),
        deviceId: SYSTEM_SOURCE,
        type: 'clock.ticked',
        data: { at: new Date(at).toISOString(), intervalSeconds: 15 },
      })
    }
    const d = k < 10 ? (DEVICES[k % 6] as string) : (DEVICES[Math.floor(rnd() * 5)] as string)
    const r = rnd()
    if (r < 0.6) {
      const value = Math.round((30 + rnd() * 20) * 10) / 10
      out.push({
        ...envelope(++n, d, at),
        type: 'reading.recorded',
        data: { metric: 'temperature', value, unit: 'C' },
      })
    } else if (r < 0.8) {
      out.push({
        ...envelope(++n, d, at),
        type: 'heartbeat.received',
        data: { batteryPercent: Math.round(5 + rnd() * 25) },
      })
    } else if (r < 0.87) {
      const status = rnd() < 0.5 ? 'maintenance' : 'active'
      out.push({ ...envelope(++n, d, at), type: 'status.changed', data: { status, reason: 'ops' } })
    } else {
      out.push({
        ...envelope(++n, d, at),
        type: 'reading.recorded',
        data: { metric: 'humidity', value: 50, unit: '%' },
      })
    }
  }
  // Out of HLC order: some device events swapped with the next (never across a tick).
  for (let s = 0; s < 20; s++) {
    const i = 6 + Math.floor(rnd() * (out.length - 8))
    const [a, b] = [out[i] as FleetEvent, out[i + 1] as FleetEvent]
    if (a.type !== 'clock.ticked' && b.type !== 'clock.ticked') [out[i], out[i + 1]] = [b, a]
  }
  // Delivered again: right after (the same chunk) and much later (another chunk).
  for (let s = 0; s < 12; s++) {
    const from = Math.floor(rnd() * out.length)
    const e = out[from] as FleetEvent
    if (e.type === 'clock.ticked') continue
    const to = s % 2 === 0 ? from + 1 : Math.min(out.length, from + 20 + Math.floor(rnd() * 40))
    out.splice(to, 0, e)
  }
  return out
}

/** Acknowledgements of some alerts, by HLC after their raise, delivered at the end. */
function acks(alerts: readonly { alert_id: string; device_id: string; raised_hlc: string }[]) {
  return alerts.slice(0, 3).map((a, i): FleetEvent => {
    const at = Number(a.raised_hlc.split('-')[0]) + 500
    return {
      ...envelope(90_000 + i, a.device_id, at),
      type: 'alert.acknowledged',
      data: { alertId: a.alert_id, by: 'operator' },
    }
  })
}

const projected = (events: readonly FleetEvent[]): ProjectedEvent[] =>
  events.map((event, i) => ({ event, streamSeq: i + 1, ingestedAt: new Date(T0) }))

function chunked<T>(items: readonly T[], size: number): T[][] {
  const out: T[][] = []
  for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size))
  return out
}

/**
 * The batches the projection's `apply` must be given to end where the bulk load ends: each
 * window's sensors as one batch; the sensors of a window already written, chunk by chunk; after
 * the first tick, every chunk as it is.
 */
function batchesOf(
  chunks: readonly ProjectedEvent[][],
  handles: readonly string[],
  maxSensors: number,
): ProjectedEvent[][] {
  const out: ProjectedEvent[][] = []
  const written = new Set<string>()
  let window: ProjectedEvent[] = []
  let ids = new Set<string>()
  let live = false
  const flush = () => {
    if (window.length > 0) out.push(window)
    for (const id of ids) written.add(id)
    window = []
    ids = new Set()
  }
  for (const chunk of chunks) {
    if (live) {
      out.push(chunk)
      continue
    }
    const mine = chunk.filter((p) => handles.includes(p.event.type))
    const tick = mine.findIndex((p) => p.event.type === 'clock.ticked')
    const head = tick < 0 ? mine : mine.slice(0, tick)
    const old = head.filter((p) => written.has(p.event.deviceId))
    if (old.length > 0) out.push(old)
    for (const p of head.filter((p) => !written.has(p.event.deviceId))) {
      window.push(p)
      ids.add(p.event.deviceId)
    }
    if (tick >= 0) {
      flush()
      live = true
      out.push(mine.slice(tick))
    } else if (ids.size > maxSensors) flush()
  }
  flush()
  return out
}

describe('the bulk loads of sensor-status and alerts', () => {
  const pools: pg.Pool[] = []
  const log = createLogger({ level: 'silent', name: 'test' })
  afterAll(async () => {
    for (const p of pools) await p.end()
  })

  /** A fresh database with the projections' tables. */
  async function schema(_name: string): Promise<{ pool: pg.Pool; db: Kysely<Database> }> {
    const pool = createPool(await freshDatabase(), { log, max: 2 })
    pools.push(pool)
    const db = createKysely<Database>(pool)
    await migrateToLatest(db as Kysely<unknown>)
    return { pool, db }
  }

  async function rows(db: Kysely<Database>, table: string): Promise<string[]> {
    const r = await sql<{ r: string }>`select to_jsonb(t)::text as r from ${sql.table(table)} t
      order by 1`.execute(db)
    return r.rows.map((x) => x.r)
  }

  async function live(db: Kysely<Database>, p: AnyProjection, batches: ProjectedEvent[][]) {
    for (const b of batches) await db.transaction().execute((trx) => p.apply(trx, b))
  }

  async function bulk(pool: pg.Pool, load: SensorBulkLoad, chunks: ProjectedEvent[][]) {
    for (const c of chunks) {
      await onOneConnection(pool, (one, copy) =>
        one.transaction().execute((trx) => load.apply(trx, c, copy)),
      )
    }
    await onOneConnection(pool, (one, copy) =>
      one.transaction().execute((trx) => load.finish(trx, copy)),
    )
  }

  async function compare(
    name: string,
    events: readonly FleetEvent[],
    chunkSize: number,
    maxSensors: number,
    maxHeldInputs?: number,
  ): Promise<Record<string, number>> {
    const chunks = chunked(projected(events), chunkSize)
    const counts: Record<string, number> = {}
    const specs = [
      {
        make: () => anyEvents(alertsProjection(ALERTS)),
        load: (p: AnyProjection) => alertsBulkLoad(p, ALERTS, maxSensors, maxHeldInputs),
      },
      {
        make: () => anyEvents(sensorStatusProjection(STATUS)),
        load: (p: AnyProjection) => sensorStatusBulkLoad(p, STATUS, maxSensors),
      },
    ]
    for (const [i, s] of specs.entries()) {
      const given = await schema(`${name}_live_${i}`)
      const p = s.make()
      await live(given.db, p, batchesOf(chunks, p.handles, maxSensors))
      const built = await schema(`${name}_bulk_${i}`)
      const q = s.make()
      await bulk(built.pool, s.load(q), chunks)
      for (const table of p.tables) {
        const want = await rows(given.db, table)
        expect(await rows(built.db, table), `${p.name}: ${table}`).toEqual(want)
        counts[table] = want.length
      }
    }
    return counts
  }

  it('writes each sensor once: the tables of apply given every event as one batch', async () => {
    // given the stream, with acknowledgements of alerts it raises
    const first = await schema('probe')
    const events = stream(false)
    await live(first.db, anyEvents(alertsProjection(ALERTS)), [projected(events)])
    const raised = await first.db.selectFrom('alerts').selectAll().orderBy('alert_id').execute()
    expect(raised.length).toBeGreaterThan(2)
    const all = [...events, ...acks(raised)]
    // when it is bulk loaded in chunks, then every table is as apply leaves it
    const counts = await compare('one', all, 7, 1000)
    // and the stream exercised what it should
    expect(counts.alerts).toBeGreaterThan(2)
    expect(counts.alert_horizons).toBeGreaterThan(0)
    expect(counts.sensor_status_history).toBeGreaterThan(6)
  })

  it('past the bound of sensors, writes a window mid-way and goes on', async () => {
    // Sensors first seen by their readings: the first window holds all of them, folded far
    // enough to prune; later events of its sensors go through apply.
    const events = stream(false, 11).filter((e) => e.type !== 'sensor.registered')
    const counts = await compare('bound', events, 40, 3)
    expect(counts.alert_horizons).toBeGreaterThan(0)
  })

  it('past the bound of held inputs, stores them as it goes and prunes them in the table', async () => {
    // The window holds 10 inputs, then stores them and every later one as its chunk arrives;
    // the flush reads them back, and prunes them in alert_inputs.
    const events = stream(false, 19)
    const counts = await compare('spill', events, 7, 1000, 10)
    expect(counts.alert_horizons).toBeGreaterThan(0)
    expect(counts.alert_inputs).toBeGreaterThan(0)
  })

  it('at the first clock tick, writes the window and applies the rest as apply does', async () => {
    const events = stream(true, 13)
    const counts = await compare('tick', events, 9, 3)
    // some sensor fell silent
    expect(counts.projection_clocks).toBe(1)
  })

  it('the bulk load ends where chunk-by-chunk apply ends, in the rows a reader sees', async () => {
    const events = stream(false, 17)
    const chunks = chunked(projected(events), 6)
    const p = anyEvents(sensorStatusProjection(STATUS))
    const given = await schema('chunks_live')
    await live(given.db, p, chunks)
    const built = await schema('chunks_bulk')
    await bulk(
      built.pool,
      sensorStatusBulkLoad(anyEvents(sensorStatusProjection(STATUS)), STATUS),
      chunks,
    )
    for (const table of p.tables)
      expect(await rows(built.db, table), table).toEqual(await rows(given.db, table))
    const a = anyEvents(alertsProjection(ALERTS))
    const givenA = await schema('chunks_live_a')
    await live(givenA.db, a, chunks)
    const builtA = await schema('chunks_bulk_a')
    await bulk(builtA.pool, alertsBulkLoad(anyEvents(alertsProjection(ALERTS)), ALERTS), chunks)
    for (const table of [
      'alerts',
      'alert_conditions',
      'notification_outbox',
      'alert_sensors',
      'alert_sensors_timeline',
    ])
      expect(await rows(builtA.db, table), table).toEqual(await rows(givenA.db, table))
  })

  it('a COPY aside that fails while the next slice folds fails the flush, and nothing else', async () => {
    // 350 sensors, one reading each: four slices at the flush, each slice's inputs sent aside
    // while the next one folds. Postgres refuses one input of the second (its connection open by then: it fails fast).
    const events: FleetEvent[] = Array.from({ length: 350 }, (_, i) => ({
      ...envelope(i + 1, `s-${String(i).padStart(3, '0')}`, T0 + i),
      type: 'reading.recorded',
      data: { metric: 'temperature', value: i === 150 ? 999 : 20, unit: 'C' },
    }))
    const built = await schema('aside')
    await sql`alter table alert_inputs add constraint below_500 check (value < 500)`.execute(
      built.db,
    )
    const load = alertsBulkLoad(anyEvents(alertsProjection(ALERTS)), ALERTS)
    await expect(bulk(built.pool, load, [projected(events)])).rejects.toThrow(/below_500/)
  })
})
