import { sql, type Kysely } from 'kysely'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { alertsProjection } from '../projections/alerts.ts'
import { parseAlertRules } from '../projections/alert-rules.ts'
import { anyEvents, type AnyProjection } from '../projections/projection.ts'
import { sensorStatusProjection } from '../projections/sensor-status.ts'
import type { Database } from '../projections/tables.ts'
import type { FleetEvent } from '../schemas/events.ts'
import { encodeHlc } from '../schemas/hlc.ts'
import { migratedDatabase } from './harness/test-servers.ts'
import { temperatureReading, TEMPERATURE_HIGH } from './fixtures.ts'

/**
 * The sensor projections write only what changed: a sensor only seen again gets its last seen
 * columns updated (the rest of its row as it was), and a batch that changes nothing for a sensor
 * (a redelivery) writes none of its rows. Either way the tables are what one batch of all the
 * events makes of them.
 */
const RULES = parseAlertRules({
  rules: [TEMPERATURE_HIGH, { id: 'sensor-silent', kind: 'silent', severity: 'warning' }],
})
const T0 = 1_796_000_000_000
const TIMEOUT_SECONDS = 60

const reading = (device: string, id: string, at: number, value: number): FleetEvent =>
  temperatureReading(device, id, T0, at, value)

function stamp(id: string, atSeconds: number) {
  const wallMs = T0 + atSeconds * 1000
  return {
    eventId: id,
    version: 1 as const,
    occurredAt: new Date(wallMs).toISOString(),
    hlc: encodeHlc({ wallMs, logical: 0, node: 'gw' }),
    correlationId: `c-${id}`,
  }
}

function registered(device: string, id: string, at: number, firmware: string): FleetEvent {
  return {
    ...stamp(id, at),
    deviceId: device,
    type: 'sensor.registered',
    data: { site: 'site-a', model: 'm1', firmware },
  }
}

function statusChanged(device: string, id: string, at: number, status: 'maintenance'): FleetEvent {
  return { ...stamp(id, at), deviceId: device, type: 'status.changed', data: { status } }
}

/** Batches in which two sensors are seen again, re-registered and put into maintenance. */
const BATCHES: readonly (readonly FleetEvent[])[] = [
  [registered('s-1', 'g1', 0, '1.0'), reading('s-2', 'r1', 1, 20)],
  [reading('s-1', 'r2', 2, 41), reading('s-2', 'r3', 3, 21)],
  [reading('s-1', 'r4', 4, 42), reading('s-2', 'r5', 5, 22)],
  [registered('s-1', 'g2', 6, '1.1'), reading('s-2', 'r6', 6, 43)],
  [reading('s-1', 'r7', 7, 30), statusChanged('s-2', 'm1', 8, 'maintenance')],
  [reading('s-1', 'r8', 9, 31), reading('s-2', 'r9', 10, 44)],
]

const PROJECTIONS: Record<string, () => AnyProjection> = {
  'sensor-status': () =>
    anyEvents(sensorStatusProjection({ defaultTimeoutSeconds: TIMEOUT_SECONDS })),
  alerts: () =>
    anyEvents(alertsProjection({ rules: RULES, defaultTimeoutSeconds: TIMEOUT_SECONDS })),
}

describe.each(Object.keys(PROJECTIONS))('%s writes only what changed', (name) => {
  const projection = PROJECTIONS[name] as () => AnyProjection
  const tables = projection().tables
  let db: Kysely<Database>
  beforeAll(async () => {
    db = await migratedDatabase()
  })
  afterAll(async () => {
    await db.destroy()
  })
  beforeEach(async () => {
    await sql`truncate ${sql.join(tables.map((t) => sql.table(t)))}`.execute(db)
  })

  const seqs = new Map<string, number>()
  const projected = (events: readonly FleetEvent[]) =>
    events.map((event) => {
      const streamSeq = seqs.get(event.eventId) ?? seqs.size + 1
      seqs.set(event.eventId, streamSeq)
      return { event, streamSeq, ingestedAt: new Date(T0) }
    })
  const apply = (p: AnyProjection, events: readonly FleetEvent[]) =>
    db.transaction().execute((trx) => p.apply(trx, projected(events)))

  /** Every table's rows, with the id of the transaction that wrote each (`xmin`). */
  async function dump(): Promise<Record<string, { row: string; xmin: string }[]>> {
    const out: Record<string, { row: string; xmin: string }[]> = {}
    for (const t of tables) {
      const rows = (
        await sql<Record<string, unknown>>`select t.*, t.xmin::text as xmin
          from ${sql.table(t)} t`.execute(db)
      ).rows
      out[t] = rows
        .map(({ xmin, ...row }) => {
          // Bookkeeping that depends on the batches by design: readings since the last trim.
          if (t === 'alert_tips') delete row.readings_since_prune
          return { row: JSON.stringify(row), xmin: String(xmin) }
        })
        .sort((a, b) => (a.row < b.row ? -1 : 1))
    }
    return out
  }
  const rowsOf = (d: Record<string, { row: string }[]>) =>
    Object.fromEntries(Object.entries(d).map(([t, rs]) => [t, rs.map((r) => r.row)]))

  it('a sensor seen again keeps the rest of its row: the tables equal one batch', async () => {
    const kept = projection()
    for (const batch of BATCHES) await apply(kept, batch)
    // A new projection per batch reads every sensor back from its row.
    const live = rowsOf(await dump())
    await sql`truncate ${sql.join(tables.map((t) => sql.table(t)))}`.execute(db)
    for (const batch of BATCHES) await apply(projection(), batch)
    const readBack = rowsOf(await dump())
    await sql`truncate ${sql.join(tables.map((t) => sql.table(t)))}`.execute(db)
    await apply(projection(), BATCHES.flat())
    const once = rowsOf(await dump())
    expect(live).toEqual(once)
    expect(readBack).toEqual(once)
    const firmware = name === 'alerts' ? 'alert_sensors' : 'sensor_status'
    expect(once[firmware]?.find((r) => r.includes('"s-1"'))).toContain('"firmware":"1.1"')
  })

  it('a batch that changes nothing writes nothing', async () => {
    const p = projection()
    for (const batch of BATCHES) await apply(p, batch)
    const before = await dump()
    // Redelivered: by the same projection (what it kept), then by a new one (read back).
    await apply(p, BATCHES.at(-1) ?? [])
    await apply(projection(), BATCHES.flat())
    expect(await dump()).toEqual(before)
  })
})
