import { sql, type Kysely } from 'kysely'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { parseAlertRules } from '../projections/alert-rules.ts'
import { alertsProjection } from '../projections/alerts.ts'
import { anyEvents, type AnyProjection } from '../projections/projection.ts'
import { readingsProjection } from '../projections/readings.ts'
import { sensorStatusProjection } from '../projections/sensor-status.ts'
import type { Database } from '../projections/tables.ts'
import type { FleetEvent } from '../schemas/events.ts'
import { migratedDatabase } from './harness/test-servers.ts'
import { temperatureReading, TEMPERATURE_HIGH } from './fixtures.ts'

/**
 * The rows that every reading rewrites (a sensor's state and alert tip, its newest value, the
 * current minute's rollup) are updated in place, as heap-only tuples: no new index entry and no
 * new page per update. Each table leaves room on its pages for that (its fillfactor; a rebuild's
 * new tables keep it: test/blue-green.int.test.ts).
 *
 * Counted in the updating transaction itself (`pg_stat_xact_user_tables`): one batch inserts the
 * rows of 400 sensors, the next rewrites half of them. With full pages (the default fillfactor)
 * none of the 200 updates of `latest_readings` or `readings_per_minute` was HOT.
 */
const T0 = 1_796_000_000_000
const SENSORS = 400
const RULES = parseAlertRules({ rules: [TEMPERATURE_HIGH] })

/** Table -> the projection that rewrites its rows. */
const REWRITTEN: Record<string, AnyProjection> = {
  sensor_status: anyEvents(sensorStatusProjection({ defaultTimeoutSeconds: 600 })),
  alert_sensors: anyEvents(alertsProjection({ rules: RULES, defaultTimeoutSeconds: 600 })),
  alert_tips: anyEvents(alertsProjection({ rules: RULES, defaultTimeoutSeconds: 600 })),
  latest_readings: anyEvents(readingsProjection),
  readings_per_minute: anyEvents(readingsProjection),
}

/** A reading of each of `sensors` (of the fleet named `fleet`) at second `at` of one minute. */
const readings = (fleet: string, sensors: readonly number[], at: number): FleetEvent[] =>
  sensors.map((i) =>
    temperatureReading(`${fleet}-${i}`, `${fleet}-${at}-${i}`, T0, at, 20 + (i % 5)),
  )

describe('rows every reading rewrites are updated in place (HOT)', () => {
  let db: Kysely<Database>
  beforeAll(async () => {
    db = await migratedDatabase()
  })
  afterAll(async () => {
    await db.destroy()
  })

  let seq = 0
  /** What `pg_stat_xact_user_tables` counts for `table` on this connection so far. */
  const counted = async (trx: Kysely<Database>, table: string) =>
    (
      await sql<{ updated: number; hot: number }>`
        select n_tup_upd::integer as updated, n_tup_hot_upd::integer as hot
        from pg_stat_xact_user_tables where relname = ${table}`.execute(trx)
    ).rows[0] ?? { updated: 0, hot: 0 }
  /**
   * Applies `events` in one transaction; the updates of `table` it made, and how many were HOT.
   * A difference: the view also holds what the connection's earlier transactions counted until
   * they are flushed to the shared statistics (Postgres 15 does that at most once a second).
   */
  const apply = (p: AnyProjection, table: string, events: readonly FleetEvent[]) =>
    db.transaction().execute(async (trx) => {
      const before = await counted(trx, table)
      await p.apply(
        trx,
        events.map((event) => ({ event, streamSeq: ++seq, ingestedAt: new Date(T0) })),
      )
      const after = await counted(trx, table)
      return { updated: after.updated - before.updated, hot: after.hot - before.hot }
    })

  it.each(Object.keys(REWRITTEN))('%s', async (table) => {
    const projection = REWRITTEN[table] as AnyProjection
    const all = Array.from({ length: SENSORS }, (_, i) => i)
    const first = await apply(projection, table, readings(table, all, 1))
    expect(first.updated).toBe(0)
    const again = await apply(
      projection,
      table,
      readings(
        table,
        all.filter((i) => i % 2 === 0),
        2,
      ),
    )
    expect(again).toEqual({ updated: SENSORS / 2, hot: SENSORS / 2 })
  })
})
