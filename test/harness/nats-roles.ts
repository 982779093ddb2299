import { randomBytes } from 'node:crypto'
import { fileURLToPath } from 'node:url'
import { jetstreamManager, type JetStreamManager } from '@nats-io/jetstream'
import { connect, type ConnectionOptions, type NatsConnection } from '@nats-io/transport-node'
import { startNatsServer, type NatsServer } from './nats-server.ts'
import { freePort } from './processes.ts'

/** The repository root (the harness lives in test/harness/). */
export const repoRoot = fileURLToPath(new URL('../..', import.meta.url))
/** The single-node config: development, and the role and MQTT tests. */
export const NATS_CONF = fileURLToPath(new URL('../../nats.conf', import.meta.url))
/** The config of each node of the 3-node cluster (docker compose and the chaos suite). */
export const CLUSTER_NODE_CONF = fileURLToPath(
  new URL('../../infra/nats/cluster-node.conf', import.meta.url),
)

/** The users of infra/nats/accounts.conf. */
export const ROLES = ['admin', 'processor', 'device', 'system'] as const
export type Role = (typeof ROLES)[number]

export interface Credentials {
  readonly user: string
  readonly password: string
  /** What a fleetstream process in this role sets as NATS_INBOX_PREFIX. */
  readonly inboxPrefix: string
}

/** Fresh random passwords for each role (and the cluster's routes), never the dev defaults. */
export interface RoleSecrets {
  readonly roles: Readonly<Record<Role, Credentials>>
  readonly routePassword: string
}

const INBOX: Record<Role, string> = {
  admin: '_INBOX_admin',
  processor: '_INBOX_processor',
  device: '_INBOX',
  system: '_INBOX',
}

export function generateSecrets(): RoleSecrets {
  // nats-server parses a variable's value as config: a password starts with a letter and holds
  // only letters, digits, '-' and '_' (infra/nats/accounts.conf).
  const pw = () => `p${randomBytes(12).toString('hex')}`
  const roles = Object.fromEntries(
    ROLES.map((r) => [r, { user: r, password: pw(), inboxPrefix: INBOX[r] }]),
  ) as Record<Role, Credentials>
  return { roles, routePassword: pw() }
}

/** The password variables the repository's configs read (as infra/dev.env sets them). */
export function passwordEnv(s: RoleSecrets): Record<string, string> {
  return {
    NATS_ADMIN_PASSWORD: s.roles.admin.password,
    NATS_PROCESSOR_PASSWORD: s.roles.processor.password,
    NATS_DEVICE_PASSWORD: s.roles.device.password,
    NATS_SYSTEM_PASSWORD: s.roles.system.password,
  }
}

/** NATS_USER, NATS_PASSWORD and NATS_INBOX_PREFIX of a fleetstream process in `role`. */
export function roleEnv(s: RoleSecrets, role: Role): Record<string, string> {
  const c = s.roles[role]
  return { NATS_USER: c.user, NATS_PASSWORD: c.password, NATS_INBOX_PREFIX: c.inboxPrefix }
}

/** nats.js connection options of `role` (what connectNats makes of {@link roleEnv}). */
export function roleConnectOptions(s: RoleSecrets, role: Role): Partial<ConnectionOptions> {
  const c = s.roles[role]
  return { user: c.user, pass: c.password, inboxPrefix: c.inboxPrefix }
}

/**
 * nats-server started with the repository's own nats.conf (accounts, roles, limits, MQTT) on
 * random loopback ports, with fresh passwords.
 *
 * @example
 * const ns = await startRoleNatsServer()
 * const nc = await ns.connect('device')
 * const env = { ...testEnv(ns.url, dbUrl), ...ns.env('processor') }
 */
export interface RoleNatsServer {
  readonly server: NatsServer
  readonly url: string
  readonly mqttPort: number
  readonly monitorUrl: string
  readonly secrets: RoleSecrets
  /** Environment of a fleetstream process in `role` (NATS_USER, NATS_PASSWORD, NATS_INBOX_PREFIX). */
  env(role: Role): Record<string, string>
  connect(role: Role, opts?: Partial<ConnectionOptions>): Promise<NatsConnection>
  /** An admin connection and its JetStream manager, as an operator's nats CLI would have. */
  admin(): Promise<{ nc: NatsConnection; jsm: JetStreamManager }>
  cleanup(): Promise<void>
}

export async function startRoleNatsServer(): Promise<RoleNatsServer> {
  const secrets = generateSecrets()
  const [port, monitorPort, mqttPort] = [await freePort(), await freePort(), await freePort()]
  // The flags infra/dev-services.sh passes, with ports of our own; the store under the
  // server's temp dir (its working directory).
  const server = await startNatsServer({
    configFile: NATS_CONF,
    args: ['-a', '127.0.0.1', '-p', String(port), '-m', String(monitorPort), '-sd', 'js'],
    env: { ...passwordEnv(secrets), NATS_MQTT_PORT: String(mqttPort) },
  })
  const url = server.url
  const ns: RoleNatsServer = {
    server,
    url,
    mqttPort,
    monitorUrl: `http://127.0.0.1:${monitorPort}`,
    secrets,
    env: (role) => roleEnv(secrets, role),
    connect: (role, opts = {}) =>
      connect({ servers: url, ...roleConnectOptions(secrets, role), ...opts }),
    async admin() {
      const nc = await ns.connect('admin')
      return { nc, jsm: await jetstreamManager(nc) }
    },
    cleanup: () => server.cleanup(),
  }
  return ns
}
