import fc from 'fast-check'
import { sql, type Kysely } from 'kysely'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { alertId, alertsProjection } from '../projections/alerts.ts'
import { parseAlertRules } from '../projections/alert-rules.ts'
import { migrateToLatest } from '../projections/migrate.ts'
import { anyEvents, type AnyProjection, type ProjectedEvent } from '../projections/projection.ts'
import { readingsProjection } from '../projections/readings.ts'
import { foldTimeline } from '../projections/sensor-tracker.ts'
import { sensorStatusProjection } from '../projections/sensor-status.ts'
import type { Database } from '../projections/tables.ts'
import type { FleetEvent, SensorStatus } from '../schemas/events.ts'
import { encodeHlc } from '../schemas/hlc.ts'
import { migratedDatabase } from './harness/test-servers.ts'
import { TEMPERATURE_HIGH } from './fixtures.ts'

/**
 * Every column of every read model is a function of the SET of events, not of the order they
 * arrive in (README, "Guarantees": the columns listed there excepted). The same events go through
 * the real projections on Postgres once in HLC order and once in an arbitrary arrival order, in
 * arbitrary batches, with copies of some arriving again later under new stream sequences (a
 * re-send past the dedup window); the whole tables must be equal.
 *
 * Reproduce a failure with ARRIVAL_ORDER_SEED=<seed> (and ARRIVAL_ORDER_PATH=<path> from the
 * failure message); ARRIVAL_ORDER_RUNS sets the number of runs.
 */

/** Columns the README declares arrival-dependent: the copy that was applied, and when it was stored. */
const ARRIVAL_DEPENDENT: Readonly<Record<string, readonly string[]>> = {
  readings: ['stream_seq', 'ingested_at'],
  latest_readings: ['stream_seq'],
  sensor_status_history: ['stream_seq'],
  sensor_status_timeline: ['stream_seq', 'again_stream_seq'],
  alert_sensors_timeline: ['stream_seq', 'again_stream_seq'],
  notification_outbox: ['published_at'],
  // bookkeeping: the newest input folded so far, readings since the window was last trimmed
  alert_tips: ['hlc', 'event_id', 'history', 'readings_since_prune'],
}

const TABLES = [
  'readings',
  'latest_readings',
  'readings_per_minute',
  'sensor_status',
  'sensor_status_history',
  'alerts',
  'alert_conditions',
  'alert_sensors',
  'notification_outbox',
  'projection_clocks',
] as const

const RULES = parseAlertRules({
  rules: [
    TEMPERATURE_HIGH,
    { id: 'battery-low', kind: 'battery-low', below: 15, clear: 20, severity: 'warning' },
    { id: 'sensor-silent', kind: 'silent', severity: 'warning' },
  ],
})

const T0 = 1_795_000_000_000
const TIMEOUT_SECONDS = 30
const STATUSES: readonly SensorStatus[] = ['active', 'inactive', 'maintenance', 'decommissioned']

type Spec =
  | { kind: 'registered'; at: number; timeout: number | null; firmware: number }
  | { kind: 'reading'; at: number; value: number }
  | { kind: 'heartbeat'; at: number; battery: number | null }
  | { kind: 'status'; at: number; status: SensorStatus }
  | { kind: 'ack'; at: number; of: number }

/** Seconds after T0: few distinct values, so that ties and near-ties happen. */
const arbAt = fc.integer({ min: 0, max: 120 })
const arbSpec: fc.Arbitrary<Spec> = fc.oneof(
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant('registered' as const),
      at: arbAt,
      timeout: fc.constantFrom(null, 20, 90),
      firmware: fc.nat(9),
    }),
  },
  {
    weight: 4,
    arbitrary: fc.record({
      kind: fc.constant('reading' as const),
      at: arbAt,
      value: fc.integer({ min: 30, max: 50 }),
    }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant('heartbeat' as const),
      at: arbAt,
      battery: fc.option(fc.integer({ min: 5, max: 30 })),
    }),
  },
  {
    weight: 3,
    arbitrary: fc.record({
      kind: fc.constant('status' as const),
      at: arbAt,
      status: fc.constantFrom(...STATUSES),
    }),
  },
  {
    // often enough that some acknowledge the alert open at their HLC
    weight: 3,
    arbitrary: fc.record({ kind: fc.constant('ack' as const), at: arbAt, of: fc.nat() }),
  },
)

interface Fleet {
  readonly events: readonly FleetEvent[]
}

const arbFleet: fc.Arbitrary<Fleet> = fc
  .record({
    sensors: fc.array(fc.array(arbSpec, { minLength: 10, maxLength: 30 }), {
      minLength: 2,
      maxLength: 4,
    }),
    ticks: fc.uniqueArray(fc.integer({ min: 0, max: 200 }), { maxLength: 3 }),
  })
  .map(({ sensors, ticks }) => {
    const events: FleetEvent[] = []
    sensors.forEach((specs, s) => {
      const deviceId = `sensor-${s}`
      const readings: string[] = []
      specs.forEach((spec, i) => {
        const wallMs = T0 + spec.at * 1000
        const base = {
          eventId: `${deviceId}-e${i}`,
          deviceId,
          version: 1 as const,
          occurredAt: new Date(wallMs).toISOString(),
          // two gateways: events at one wall time, with one HLC (distinct events) or not
          hlc: encodeHlc({ wallMs, logical: 0, node: `gw-${i % 2}` }),
          correlationId: `c-${deviceId}-${i}`,
        }
        switch (spec.kind) {
          case 'registered':
            events.push({
              ...base,
              type: 'sensor.registered',
              data: {
                site: `site-${s}`,
                model: 'fs-th-200',
                firmware: `1.${spec.firmware}`,
                ...(spec.timeout === null ? {} : { inactivityTimeoutSeconds: spec.timeout }),
              },
            })
            return
          case 'reading':
            readings.push(base.eventId)
            events.push({
              ...base,
              type: 'reading.recorded',
              data: { metric: 'temperature', value: spec.value, unit: 'C' },
            })
            return
          case 'heartbeat':
            events.push({
              ...base,
              type: 'heartbeat.received',
              data: spec.battery === null ? {} : { batteryPercent: spec.battery },
            })
            return
          case 'status':
            events.push({ ...base, type: 'status.changed', data: { status: spec.status } })
            return
          case 'ack': {
            // acknowledges the alert a reading of this sensor would raise
            const raising = readings[spec.of % Math.max(1, readings.length)] ?? `${deviceId}-e0`
            events.push({
              ...base,
              type: 'alert.acknowledged',
              causationId: raising,
              data: { alertId: alertId('temperature-high', deviceId, raising), by: 'jo' },
            })
            return
          }
        }
      })
    })
    for (const t of ticks) {
      const at = new Date(T0 + t * 1000).toISOString()
      events.push({
        eventId: `tick-${T0 + t * 1000}`,
        deviceId: '_system',
        type: 'clock.ticked',
        version: 1,
        occurredAt: at,
        hlc: encodeHlc({ wallMs: T0 + t * 1000, logical: 0, node: 'clock' }),
        correlationId: `c-tick-${t}`,
        data: { at, intervalSeconds: 10 },
      })
    }
    return { events }
  })

/** The order events arrive in: a permutation, copies of some arriving again later, batch cuts. */
interface Arrival {
  readonly keys: readonly number[]
  readonly again: readonly number[]
  readonly batches: readonly number[]
}
const arbArrival: fc.Arbitrary<Arrival> = fc.record({
  keys: fc.array(fc.nat(1000), { minLength: 120, maxLength: 120 }),
  again: fc.array(fc.nat(), { maxLength: 12 }),
  batches: fc.array(fc.integer({ min: 1, max: 9 }), { minLength: 1, maxLength: 12 }),
})

/**
 * Device events arrive in any order between the clock ticks around them (which tick a late event
 * arrives after is what the README declares arrival-dependent: silence is judged by what had
 * arrived when a tick was applied); copies of any event arrive again at the end.
 */
function arrive(events: readonly FleetEvent[], a: Arrival): FleetEvent[] {
  const out: FleetEvent[] = []
  let run: FleetEvent[] = []
  let k = 0
  const flush = () => {
    out.push(
      ...run
        .map((e) => ({ e, key: a.keys[k++ % a.keys.length]! }))
        .sort((x, y) => x.key - y.key)
        .map((x) => x.e),
    )
    run = []
  }
  for (const e of [...events].sort(byHlc)) {
    if (e.type === 'clock.ticked') {
      flush()
      out.push(e)
    } else run.push(e)
  }
  flush()
  // A re-send past the dedup window: the same event, later, under a new stream sequence.
  const copies = a.again.map((i) => events[i % events.length]!)
  return [...out, ...copies]
}

function inBatches(events: readonly FleetEvent[], sizes: readonly number[]): ProjectedEvent[][] {
  const out: ProjectedEvent[][] = []
  let i = 0
  let b = 0
  while (i < events.length) {
    const size = sizes[b++ % sizes.length]!
    out.push(
      events.slice(i, i + size).map((event, j) => ({
        event,
        streamSeq: i + j + 1,
        ingestedAt: new Date(T0 + 3_600_000 + (i + j) * 7),
      })),
    )
    i += size
  }
  return out
}

const byHlc = (a: FleetEvent, b: FleetEvent) =>
  a.hlc < b.hlc ? -1 : a.hlc > b.hlc ? 1 : a.eventId < b.eventId ? -1 : 1

describe('every read model is a function of the set of events, not of their arrival order', () => {
  let db: Kysely<Database>
  beforeAll(async () => {
    db = await migratedDatabase()
  })
  afterAll(async () => {
    await db.destroy()
  })

  const projections = (): AnyProjection[] => [
    anyEvents(sensorStatusProjection({ defaultTimeoutSeconds: TIMEOUT_SECONDS })),
    anyEvents(readingsProjection),
    anyEvents(alertsProjection({ rules: RULES, defaultTimeoutSeconds: TIMEOUT_SECONDS })),
  ]

  async function run(batches: readonly ProjectedEvent[][]): Promise<Record<string, unknown[]>> {
    const ps = projections()
    const tables = [...new Set(ps.flatMap((p) => p.tables as readonly string[])), ...TABLES].filter(
      (t, i, all) => all.indexOf(t) === i,
    )
    await sql`truncate ${sql.join(tables.map((t) => sql.table(t)))}`.execute(db)
    for (const batch of batches) {
      await db.transaction().execute(async (trx) => {
        for (const p of ps) await p.apply(trx, batch)
      })
    }
    const out: Record<string, unknown[]> = {}
    for (const t of tables) {
      const omit = ARRIVAL_DEPENDENT[t] ?? []
      const { rows } = await sql<Record<string, unknown>>`select * from ${sql.table(t)}`.execute(db)
      out[t] = rows
        .map((r) => Object.fromEntries(Object.entries(r).filter(([c]) => !omit.includes(c))))
        .map((r) => JSON.parse(JSON.stringify(r)) as unknown)
        .sort((a, b) => (JSON.stringify(a) < JSON.stringify(b) ? -1 : 1))
    }
    return out
  }

  const found: string[][] = []
  afterAll(() => {
    if (found.length > 0) console.log(JSON.stringify([...new Set(found.flat())].sort(), null, 1))
  })

  it(
    'the same events in many orders, in batches, with late duplicates: whole tables equal',
    async () => {
      const seed = process.env.ARRIVAL_ORDER_SEED
      const path = process.env.ARRIVAL_ORDER_PATH
      // What the runs exercised: each kind must occur, or the property proves little about alerts.
      const seen = new Map<string, number>()
      const count = (what: string, n: number) => seen.set(what, (seen.get(what) ?? 0) + n)
      await fc.assert(
        fc.asyncProperty(arbFleet, arbArrival, async (fleet, arrival) => {
          const ordered = await run(inBatches([...fleet.events].sort(byHlc), [1]))
          const shuffled = await run(inBatches(arrive(fleet.events, arrival), arrival.batches))
          if (process.env.ARRIVAL_ORDER_REPORT !== undefined) {
            const differ = differences(ordered, shuffled)
            if (differ.length > 0) found.push(differ)
            return
          }
          for (const t of Object.keys(ordered)) expect(shuffled[t], t).toEqual(ordered[t])
          const alerts = ordered.alerts as {
            rule_id: string
            state: string
            acknowledged_by: string | null
          }[]
          count('threshold alert', alerts.filter((a) => a.rule_id !== 'sensor-silent').length)
          count('silent alert', alerts.filter((a) => a.rule_id === 'sensor-silent').length)
          count('resolved', alerts.filter((a) => a.state === 'resolved').length)
          count('acknowledged', alerts.filter((a) => a.acknowledged_by !== null).length)
          count(
            'resolved notification',
            (ordered.notification_outbox as { kind: string }[]).filter((n) => n.kind === 'resolved')
              .length,
          )
          count(
            'maintenance',
            fleet.events.filter(
              (e) => e.type === 'status.changed' && e.data.status === 'maintenance',
            ).length,
          )
        }),
        {
          numRuns: Number(process.env.ARRIVAL_ORDER_RUNS ?? 25),
          ...(seed === undefined ? {} : { seed: Number(seed) }),
          ...(path === undefined ? {} : { path }),
          endOnFailure: process.env.ARRIVAL_ORDER_SHRINK === undefined,
        },
      )
      if (process.env.ARRIVAL_ORDER_REPORT === undefined && seed === undefined) {
        for (const what of [
          'threshold alert',
          'resolved',
          'acknowledged',
          'resolved notification',
          'maintenance',
        ])
          expect(seen.get(what) ?? 0, what).toBeGreaterThan(0)
      }
    },
    Math.max(120_000, Number(process.env.ARRIVAL_ORDER_RUNS ?? 25) * 5000),
  )

  it('a status names the earliest event of its current run, however late that event arrives', async () => {
    const e = (i: number, at: number, status?: SensorStatus): FleetEvent => {
      const wallMs = T0 + at * 1000
      const base = {
        eventId: `ex-${i}`,
        deviceId: 'sensor-00008',
        version: 1 as const,
        occurredAt: new Date(wallMs).toISOString(),
        hlc: encodeHlc({ wallMs, logical: 0, node: 'gw' }),
        correlationId: `c-${i}`,
      }
      return status === undefined
        ? { ...base, type: 'sensor.registered', data: { site: 's', model: 'm', firmware: '1' } }
        : { ...base, type: 'status.changed', data: { status } }
    }
    const registered = e(0, 0)
    const early = e(1, 10, 'maintenance') // arrives last
    const later = e(2, 20, 'maintenance')
    const status = async () =>
      (await db.selectFrom('sensor_status').selectAll().executeTakeFirstOrThrow()).status_event_id
    const history = async () =>
      (
        await db
          .selectFrom('sensor_status_history')
          .select(['event_id', 'from_status', 'to_status'])
          .orderBy('hlc')
          .execute()
      ).map((h) => `${h.from_status ?? '-'}>${h.to_status}@${h.event_id}`)

    await run(inBatches([registered, later, early], [1]))
    expect(await status()).toBe('ex-1')
    expect(await history()).toEqual(['->active@ex-0', 'active>maintenance@ex-1'])

    // an `active` between the two, arriving last, splits the run: maintenance again since ex-2
    const between = e(3, 15, 'active')
    await run(inBatches([registered, later, early, between], [1]))
    expect(await status()).toBe('ex-2')
    expect(await history()).toEqual([
      '->active@ex-0',
      'active>maintenance@ex-1',
      'maintenance>active@ex-3',
      'active>maintenance@ex-2',
    ])
  })
})

/** `table.column` of every column whose values differ between two dumps (as multisets). */
function differences(a: Record<string, unknown[]>, b: Record<string, unknown[]>): string[] {
  const out: string[] = []
  for (const t of Object.keys(a)) {
    const ra = a[t] as Record<string, unknown>[]
    const rb = (b[t] ?? []) as Record<string, unknown>[]
    if (ra.length !== rb.length) out.push(`${t}: row count`)
    const cols = new Set([...ra, ...rb].flatMap((r) => Object.keys(r)))
    for (const c of cols) {
      const va = ra.map((r) => JSON.stringify(r[c])).sort()
      const vb = rb.map((r) => JSON.stringify(r[c])).sort()
      if (JSON.stringify(va) !== JSON.stringify(vb)) out.push(`${t}.${c}`)
    }
  }
  return out
}

describe('upgrading to status timelines', () => {
  it('keeps an existing history: the migration reads the timeline back from it', async () => {
    const db = await migratedDatabase('2026-11-23-05-stream-marks')
    try {
      const h = (
        id: string,
        from: string | null,
        to: string,
        wall: number,
        reason: string,
      ): Database['sensor_status_history'] => ({
        device_id: 's1',
        event_id: id,
        stream_seq: wall,
        from_status: from,
        to_status: to,
        hlc: encodeHlc({ wallMs: T0 + wall * 1000, logical: 0, node: 'gw' }),
        changed_at: new Date(T0 + wall * 1000),
        correlation_id: `c-${id}`,
        causation_id: null,
        reason,
      })
      const history = [
        h('e1', null, 'active', 1, 'registered'),
        h('e2', 'active', 'maintenance', 2, 'status changed to maintenance: calibration: 2 h'),
        h('e3', 'maintenance', 'active', 3, 'status changed to active'),
        h('tick', 'active', 'unknown', 50, 'silent'),
        h('e5', 'unknown', 'active', 60, 'seen again'),
      ]
      await db.insertInto('sensor_status_history').values(history).execute()
      await migrateToLatest(db as Kysely<unknown>)
      const points = await db.selectFrom('sensor_status_timeline').selectAll().execute()
      const folded = foldTimeline('s1', new Map(points.map((p) => [p.event_id, p])))
      expect(folded.map((t) => [t.eventId, t.from, t.to, t.reason, t.hlc, t.at.getTime()])).toEqual(
        history.map((r) => [
          r.event_id,
          r.from_status,
          r.to_status,
          r.reason,
          r.hlc,
          r.changed_at.getTime(),
        ]),
      )
    } finally {
      await db.destroy()
    }
  })
})
