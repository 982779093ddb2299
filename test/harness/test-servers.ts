/**
 * What the test files import to get their servers: the throwaway nats-server and Postgres of
 * testbed/ (shared with the bench), the nats-servers that run the repository's own configs
 * (roles, the 3-node cluster), and {@link freshDatabase} on the run's one Postgres cluster.
 */
import { inject } from 'vitest'
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
