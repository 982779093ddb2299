import { sql, type Kysely } from 'kysely'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { alertId, alertsProjection, trimAfter } from '../projections/alerts.ts'
import { parseAlertRules } from '../projections/alert-rules.ts'
import { migrateToLatest } from '../projections/migrate.ts'
import { anyEvents, type AnyProjection } from '../projections/projection.ts'
import type { Database } from '../projections/tables.ts'
import type { FleetEvent } from '../schemas/events.ts'
import { migratedDatabase } from './harness/test-servers.ts'
import { temperatureReading, TEMPERATURE_HIGH } from './fixtures.ts'

/**
 * Alerts folded in HLC order: what a late reading does to alerts and notifications already
 * written, and to readings beyond the window kept per (sensor, rule).
 */
const RULES = parseAlertRules({
  rules: [TEMPERATURE_HIGH],
})
const T0 = 1_795_000_000_000
const DEVICE = 'sensor-7'

function reading(id: string, atSeconds: number, value: number): FleetEvent {
  return temperatureReading(DEVICE, id, T0, atSeconds, value)
}

const byId = <T extends { id: string }>(rows: T[]): T[] =>
  [...rows].sort((a, b) => (a.id < b.id ? -1 : 1))

describe('alerts folded in HLC order', () => {
  let db: Kysely<Database>
  let seq = 0
  beforeAll(async () => {
    db = await migratedDatabase()
  })
  afterAll(async () => {
    await db.destroy()
  })
  beforeEach(async () => {
    await sql`truncate alerts, alert_conditions, alert_sensors, alert_sensors_timeline,
      alert_inputs, alert_horizons, alert_tips, notification_outbox, projection_clocks`.execute(db)
  })

  const apply = async (p: AnyProjection, events: readonly FleetEvent[]) => {
    await db.transaction().execute(async (trx) => {
      await p.apply(
        trx,
        events.map((event) => ({ event, streamSeq: ++seq, ingestedAt: new Date() })),
      )
    })
  }
  const alerts = async () =>
    (
      await db
        .selectFrom('alerts')
        .select(['raised_event_id', 'state', 'occurrences', 'resolved_event_id'])
        .orderBy('raised_hlc')
        .execute()
    ).map((a) => `${a.raised_event_id} ${a.state} x${a.occurrences} ${a.resolved_event_id ?? ''}`)
  const outbox = async () =>
    byId(
      (
        await db
          .selectFrom('notification_outbox')
          .select(['notification_id', 'kind', 'corrects', 'published_at'])
          .orderBy('notification_id')
          .execute()
      ).map((n) => ({
        id: n.notification_id,
        kind: n.kind,
        corrects: n.corrects,
        sent: n.published_at !== null,
      })),
    )

  it('a late reading moves the raise: an unsent notification is rewritten, a sent one retracted', async () => {
    const p = anyEvents(alertsProjection({ rules: RULES, defaultTimeoutSeconds: 60 }))
    // given two breaching readings: raised by the second
    await apply(p, [reading('r2', 2, 45), reading('r3', 3, 46)])
    const first = alertId('temperature-high', DEVICE, 'r3')
    expect(await alerts()).toEqual(['r3 open x1 '])
    // and the relay sent its notification
    await db.updateTable('notification_outbox').set({ published_at: new Date() }).execute()

    // when an earlier breaching reading arrives late
    await apply(p, [reading('r1', 1, 44)])

    // then the alert is the one HLC order raises: by r2, with r3 a further occurrence
    const moved = alertId('temperature-high', DEVICE, 'r2')
    expect(await alerts()).toEqual(['r2 open x2 '])
    // and the sent notification stays as sent, retracted by a new one; the new alert is notified
    expect(await outbox()).toEqual(
      byId([
        { id: `${first}-raised`, kind: 'raised', corrects: null, sent: true },
        { id: `${first}-raised-c1`, kind: 'retracted', corrects: `${first}-raised`, sent: false },
        { id: `${moved}-raised`, kind: 'raised', corrects: null, sent: false },
      ]),
    )

    // when a late clearing reading splits the run before it was sent: the unsent row is deleted
    await apply(p, [reading('r1b', 1.5, 30)])
    expect(await alerts()).toEqual(['r3 open x1 '])
    expect(await outbox()).toEqual([
      { id: `${first}-raised`, kind: 'raised', corrects: null, sent: true },
    ])
  })

  it('a late clearing reading resolves a sent alert: the raise stands, the resolution is notified', async () => {
    const p = anyEvents(alertsProjection({ rules: RULES, defaultTimeoutSeconds: 60 }))
    await apply(p, [reading('r1', 1, 45), reading('r2', 2, 45), reading('r4', 4, 45)])
    await db.updateTable('notification_outbox').set({ published_at: new Date() }).execute()
    const id = alertId('temperature-high', DEVICE, 'r2')
    expect(await alerts()).toEqual(['r2 open x2 '])

    // a late clearing reading between r2 and r4: resolved by it, r4 alone does not raise again
    await apply(p, [reading('r3', 3, 30)])
    expect(await alerts()).toEqual(['r2 resolved x1 r3'])
    // the raise as sent said nothing about occurrences: it stands; the resolution is new
    expect(await outbox()).toEqual(
      byId([
        { id: `${id}-raised`, kind: 'raised', corrects: null, sent: true },
        { id: `${id}-resolved`, kind: 'resolved', corrects: null, sent: false },
      ]),
    )
  })

  it('keeps a window of readings per rule; within it a late reading takes its place, beyond it is not evaluated', async () => {
    const p = anyEvents(
      alertsProjection({ rules: RULES, defaultTimeoutSeconds: 60, windowReadings: 4 }),
    )
    // 30 readings, a breach every fourth pair; in batches of 3, in order
    const values = Array.from({ length: 30 }, (_, i) => (i % 4 < 2 ? 45 : 30))
    const events = values.map((v, i) => reading(`r${String(i).padStart(2, '0')}`, 10 + i, v))
    for (let i = 0; i < events.length; i += 3) await apply(p, events.slice(i, i + 3))
    const inOrder = await alerts()
    expect(inOrder).toHaveLength(8)
    const kept = Number(
      (await sql<{ n: string }>`select count(*) n from alert_inputs`.execute(db)).rows[0]?.n,
    )
    // the bound: the window, what this sensor folds on before a trim, and one batch
    expect(kept).toBeLessThanOrEqual(4 + trimAfter(DEVICE, 4, 1) + 3)

    // a late breaching reading just before the newest pair's run (within the window) moves it
    await apply(p, [reading('late-in', 10 + 27.5, 45)])
    const after = await alerts()
    expect(after.slice(0, 7)).toEqual(inOrder.slice(0, 7))
    expect(after[7]).toBe('r28 open x2 ') // raised by the second of late-in, r28; r29 again

    // a late breaching reading older than the window changes nothing
    await apply(p, [reading('late-out', 10 + 2.5, 45), reading('late-out2', 10 + 2.6, 45)])
    expect(await alerts()).toEqual(after)
  })

  it('sensors reporting at one rate are trimmed a few at a time, never all in one batch', async () => {
    const window = 4
    const p = anyEvents(
      alertsProjection({ rules: RULES, defaultTimeoutSeconds: 60, windowReadings: window }),
    )
    const sensors = Array.from({ length: 200 }, (_, i) => `sensor-${String(i).padStart(3, '0')}`)
    const horizons = async () =>
      new Map(
        (await db.selectFrom('alert_horizons').select(['device_id', 'hlc']).execute()).map((h) => [
          h.device_id,
          h.hlc,
        ]),
      )
    const trimmed: number[] = []
    // given every sensor sending one reading per batch, in step, for three windows
    for (let round = 0; round < 3 * window; round++) {
      const before = await horizons()
      await apply(
        p,
        sensors.map((d) => temperatureReading(d, `${d}-${round}`, T0, 10 + round, 30)),
      )
      const after = await horizons()
      trimmed.push(sensors.filter((d) => after.get(d) !== before.get(d)).length)
    }
    // then each batch trims a share of them (one trim point for all would trim all 200 at once)
    expect(Math.max(...trimmed)).toBeLessThanOrEqual(sensors.length / 2)
    expect(trimmed.filter((n) => n > 0).length).toBeGreaterThanOrEqual(window)
    // and every sensor keeps at least the window, at most what it folds on before a trim, plus one
    const kept = await db
      .selectFrom('alert_inputs')
      .select(['device_id', sql<number>`count(*)::int`.as('n')])
      .groupBy('device_id')
      .execute()
    expect(kept).toHaveLength(sensors.length)
    for (const k of kept) {
      expect(k.n).toBeGreaterThanOrEqual(window)
      expect(k.n).toBeLessThanOrEqual(window + trimAfter(k.device_id, window, 1) + 1)
    }
  })

  it('a sensor whose readings feed several rules is folded again in full only when a rule has readings past the window', async () => {
    const window = 4
    // Every temperature reading feeds two rules (two inputs), humidity-high none of them.
    const rules = parseAlertRules({
      rules: [
        TEMPERATURE_HIGH,
        { ...TEMPERATURE_HIGH, id: 'temperature-low', above: undefined, below: -10, clear: -5 },
        { ...TEMPERATURE_HIGH, id: 'humidity-high', metric: 'humidity', above: 90, clear: 85 },
      ],
    })
    const p = anyEvents(
      alertsProjection({ rules, defaultTimeoutSeconds: 60, windowReadings: window }),
    )
    const tip = async () =>
      (
        await db
          .selectFrom('alert_tips')
          .select('readings_since_prune')
          .where('device_id', '=', DEVICE)
          .executeTakeFirstOrThrow()
      ).readings_since_prune
    const horizons = async () =>
      JSON.stringify(await db.selectFrom('alert_horizons').selectAll().orderBy('rule_id').execute())
    await apply(p, [reading('r00', 10, 20)]) // a new sensor: folded in full once
    let refolds = 0
    let pruned = 0
    for (let i = 1; i < 40; i++) {
      const before = await horizons()
      const since = await tip()
      await apply(p, [reading(`r${String(i).padStart(2, '0')}`, 10 + i, 20)])
      if ((await tip()) > since) continue
      refolds++
      if ((await horizons()) !== before) pruned++
    }
    // Folded again in full once the sensor's inputs since the last reached its trim point, which
    // counts the three rules (counted against the window alone: 19 refolds of 39 readings), and
    // each time both temperature rules had readings to prune.
    const inputs = 39 * 2
    expect(refolds).toBeGreaterThanOrEqual(Math.floor(inputs / trimAfter(DEVICE, window, 3)) - 1)
    expect(refolds).toBeLessThanOrEqual(Math.floor(inputs / trimAfter(DEVICE, window, 3)))
    expect(pruned).toBe(refolds)
    const kept = await db
      .selectFrom('alert_inputs')
      .select(['rule_id', sql<number>`count(*)::int`.as('n')])
      .groupBy('rule_id')
      .orderBy('rule_id')
      .execute()
    expect(kept.map((k) => k.rule_id)).toEqual(['temperature-high', 'temperature-low'])
    for (const k of kept) expect(k.n).toBeLessThanOrEqual(trimAfter(DEVICE, window, 3) / 2 + window)
  })

  it('a redelivered reading is one input, in the batch and after it; correlation ids as sent', async () => {
    const p = anyEvents(alertsProjection({ rules: RULES, defaultTimeoutSeconds: 60 }))
    const own = { ...reading('r1', 10, 45), correlationId: 'r1' }
    // given r1 twice in one batch, with r2 (a breach: two in a row raise)
    await apply(p, [own, own, reading('r2', 11, 45)])
    expect(await alerts()).toEqual(['r2 open x1 '])
    // when r2 comes again with r3 (a breach while open: one more occurrence, counted once)
    await apply(p, [reading('r2', 11, 45), reading('r3', 12, 45), reading('r3', 12, 45)])
    // then
    expect(await alerts()).toEqual(['r2 open x2 '])
    const inputs = await db
      .selectFrom('alert_inputs')
      .select(['event_id', 'correlation_id'])
      .orderBy('event_id')
      .execute()
    expect(inputs).toEqual([
      { event_id: 'r1', correlation_id: 'r1' },
      { event_id: 'r2', correlation_id: 'c-r2' },
      { event_id: 'r3', correlation_id: 'c-r3' },
    ])
  })
})

describe('upgrading to folded alerts', () => {
  it('keeps the alerts and conditions there are: a sensor goes on from where it stood', async () => {
    const db = await migratedDatabase('2026-12-02-01-status-timeline')
    try {
      // given an alert raised before the upgrade, and its rule's condition
      const raising = reading('old-2', 2, 45)
      const id = alertId('temperature-high', DEVICE, 'old-2')
      await sql`insert into alerts (alert_id, device_id, rule_id, severity, state, message, value,
          raised_at, raised_hlc, raised_event_id, correlation_id, occurrences, last_occurrence_event_id)
        values (${id}, ${DEVICE}, 'temperature-high', 'critical', 'open', 'temperature 45 >= 40', 45,
          ${new Date(T0 + 2000).toISOString()}, ${raising.hlc}, 'old-2', 'c-old-2', 1, 'old-2')`.execute(
        db,
      )
      await sql`insert into alert_conditions (device_id, rule_id, consecutive, since_at, since_hlc, last_hlc)
        values (${DEVICE}, 'temperature-high', 2, ${new Date(T0 + 1000).toISOString()},
          ${reading('old-1', 1, 45).hlc}, ${raising.hlc})`.execute(db)
      await migrateToLatest(db as Kysely<unknown>)

      // when readings follow after the upgrade
      const p = anyEvents(alertsProjection({ rules: RULES, defaultTimeoutSeconds: 60 }))
      let seq = 0
      const apply = (events: FleetEvent[]) =>
        db.transaction().execute(async (trx) => {
          await p.apply(
            trx,
            events.map((event) => ({ event, streamSeq: ++seq, ingestedAt: new Date() })),
          )
        })
      await apply([reading('new-3', 3, 47)])
      // then the alert goes on: one more occurrence, nothing raised again
      const rows = () =>
        db.selectFrom('alerts').select(['alert_id', 'state', 'occurrences']).execute()
      expect(await rows()).toEqual([{ alert_id: id, state: 'open', occurrences: 2 }])
      // and a late reading from before the upgrade changes nothing; a clearing one resolves it
      await apply([reading('old-0', 0.5, 30)])
      await apply([reading('new-4', 4, 30)])
      expect(await rows()).toEqual([{ alert_id: id, state: 'resolved', occurrences: 2 }])
    } finally {
      await db.destroy()
    }
  })
})
