/**
 * What the test files import to get their servers: the throwaway nats-server and Postgres of
 * testbed/ (shared with the bench), the nats-servers that run the repository's own configs
 * (roles, the 3-node cluster), and {@link freshDatabase} (or {@link migratedDatabase}) on the run's
 * one Postgres cluster.
 */
import type { Kysely } from 'kysely'
import pino from 'pino'
import { inject } from 'vitest'
import { createKysely, createPool } from '../../infra/database.ts'
import { migrateTo } from '../../projections/migrate.ts'
import type { Database } from '../../projections/tables.ts'
import { createDatabase } from '../../testbed/postgres.ts'
import { HarnessError } from '../../testbed/processes.ts'

export { startNatsServer } from '../../testbed/nats-server.ts'
export type { NatsServer } from '../../testbed/nats-server.ts'
export { startNatsCluster, clusterNodeEnv, CLUSTER_NODES } from './nats-cluster.ts'
export type { NatsCluster, NodePorts } from './nats-cluster.ts'
export { startRoleNatsServer, setFleetMaxFile, generateSecrets, repoRoot } from './nats-roles.ts'
export type { RoleNatsServer } from './nats-roles.ts'
export { startPostgres } from '../../testbed/postgres.ts'
export type { PgCluster } from '../../testbed/postgres.ts'
export { HarnessError } from '../../testbed/processes.ts'

/**
 * Creates a database with a random name on the Postgres cluster shared by the whole run (started
 * by `global-setup.ts`) and returns its URL. Call it once per test file.
 *
 * @example
 * const url = await freshDatabase() // postgres://postgres@127.0.0.1:<port>/t_1a2b3c4d
 */
export async function freshDatabase(): Promise<string> {
  // Typed as always there, but absent when a config runs tests without our globalSetup.
  const port = inject('pgPort') as number | undefined
  if (port === undefined) {
    throw new HarnessError(
      "no shared Postgres: 'pgPort' was not provided; add 'test/harness/global-setup.ts' to test.globalSetup in vitest.config.ts",
    )
  }
  return createDatabase(port)
}

/**
 * A {@link freshDatabase} migrated to `migration` (the newest when none is named), through a Kysely
 * on a pool of two connections: what a test of the projections' SQL starts from.
 * `db.destroy()` closes it.
 *
 * @example
 * const db = await migratedDatabase()
 * const old = await migratedDatabase('2026-11-23-05-stream-marks') // to test an upgrade
 */
export async function migratedDatabase(migration?: string): Promise<Kysely<Database>> {
  const pool = createPool(await freshDatabase(), { max: 2, log: pino({ level: 'silent' }) })
  const db = createKysely<Database>(pool)
  await migrateTo(db as Kysely<unknown>, migration)
  return db
}
