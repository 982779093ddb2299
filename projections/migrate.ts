import { Migrator, type Kysely, type Migration, type MigrationResultSet } from 'kysely'
import * as readings from './migrations/2026-11-23-01-readings.ts'
import * as statusRollupsAlerts from './migrations/2026-11-23-02-status-rollups-alerts.ts'
import * as sensorPartition from './migrations/2026-11-23-03-sensor-partition.ts'
import * as lwwEventIds from './migrations/2026-11-23-04-lww-event-ids.ts'
import * as streamMarks from './migrations/2026-11-23-05-stream-marks.ts'
import * as statusTimeline from './migrations/2026-12-02-01-status-timeline.ts'
import * as alertInputs from './migrations/2026-12-02-02-alert-inputs.ts'
import * as hotUpdates from './migrations/2026-12-03-01-hot-updates.ts'
import * as hotReadings from './migrations/2026-12-04-01-hot-readings.ts'
import * as breachConditions from './migrations/2026-12-04-02-breach-conditions.ts'

/**
 * Every migration, by name in the order they run. Listed here rather than read from a folder so
 * the compiled build and the tests run exactly the same set.
 */
export const migrations: Readonly<Record<string, Migration>> = {
  '2026-11-23-01-readings': readings,
  '2026-11-23-02-status-rollups-alerts': statusRollupsAlerts,
  '2026-11-23-03-sensor-partition': sensorPartition,
  '2026-11-23-04-lww-event-ids': lwwEventIds,
  '2026-11-23-05-stream-marks': streamMarks,
  '2026-12-02-01-status-timeline': statusTimeline,
  '2026-12-02-02-alert-inputs': alertInputs,
  '2026-12-03-01-hot-updates': hotUpdates,
  '2026-12-04-01-hot-readings': hotReadings,
  '2026-12-04-02-breach-conditions': breachConditions,
}

/** Brings the schema up to date; concurrent callers are serialised by Kysely's migration lock. */
export function migrateToLatest(db: Kysely<unknown>): Promise<MigrationResultSet> {
  return migrateTo(db)
}

/**
 * Brings the schema to the migration named `target` (the newest when none is named): the tests of
 * an upgrade start from an older schema. Throws when a migration fails, naming it.
 */
export async function migrateTo(db: Kysely<unknown>, target?: string): Promise<MigrationResultSet> {
  const migrator = new Migrator({
    db,
    provider: { getMigrations: () => Promise.resolve(migrations) },
  })
  const result = await (target === undefined
    ? migrator.migrateToLatest()
    : migrator.migrateTo(target))
  if (result.error !== undefined) {
    const failed = result.results?.find((r) => r.status === 'Error')
    throw new Error(
      `migration ${failed?.migrationName ?? '(unknown)'} failed: ${result.error instanceof Error ? result.error.message : JSON.stringify(result.error)}`,
      {
        cause: result.error,
      },
    )
  }
  return result
}
