import { Migrator, type Kysely, type Migration, type MigrationResultSet } from 'kysely'
import * as readings from './migrations/2026-11-23-01-readings.ts'
import * as statusRollupsAlerts from './migrations/2026-11-23-02-status-rollups-alerts.ts'

/**
 * Every migration, by name in the order they run. Listed here rather than read from a folder so
 * the compiled build and the tests run exactly the same set.
 */
export const migrations: Readonly<Record<string, Migration>> = {
  '2026-11-23-01-readings': readings,
  '2026-11-23-02-status-rollups-alerts': statusRollupsAlerts,
}

/** Brings the schema up to date; concurrent callers are serialised by Kysely's migration lock. */
export async function migrateToLatest(db: Kysely<unknown>): Promise<MigrationResultSet> {
  const migrator = new Migrator({
    db,
    provider: { getMigrations: () => Promise.resolve(migrations) },
  })
  const result = await migrator.migrateToLatest()
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
