import { execFile } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { copyFile, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { jetstreamManager, type JetStreamManager } from '@nats-io/jetstream'
import { connect, type ConnectionOptions, type NatsConnection } from '@nats-io/transport-node'
import { startNatsServer, type NatsServer } from '../../testbed/nats-server.ts'
import type { DeviceCredential } from '../../cli/commands/devices-command.ts'
import { freePort, HarnessError, onFreePorts } from '../../testbed/processes.ts'

/** The repository root (the harness lives in test/harness/). */
export const repoRoot = fileURLToPath(new URL('../..', import.meta.url))
/** The built CLI (test/harness/global-setup.ts builds it). */
const CLI = fileURLToPath(new URL('../../dist/cli/fleetstream.js', import.meta.url))
/** The single-node config: development, and the role and MQTT tests. */
export const NATS_CONF = fileURLToPath(new URL('../../nats.conf', import.meta.url))

/** The files nats.conf includes from infra/nats/. */
const NATS_INCLUDES = ['limits.conf', 'accounts.conf', 'devices.conf'] as const

/** The shared users of infra/nats/accounts.conf (devices have users of their own). */
export const ROLES = ['admin', 'processor', 'gateway', 'system'] as const
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
  gateway: '_INBOX_gateway',
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
    NATS_GATEWAY_PASSWORD: s.roles.gateway.password,
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
 * const nc = await ns.connect('gateway')
 * await runCli(['devices', 'add', 'sensor-1'], ns.devicesEnv()) // a device of its own
 * const env = { ...testEnv(ns.url, dbUrl), ...ns.env('processor') }
 */
export interface RoleNatsServer {
  readonly server: NatsServer
  readonly url: string
  readonly mqttPort: number
  readonly monitorUrl: string
  readonly secrets: RoleSecrets
  /** This server's copy of nats.conf and infra/nats/ (what an operator would edit). */
  readonly configDir: string
  /** Environment of a fleetstream process in `role` (NATS_USER, NATS_PASSWORD, NATS_INBOX_PREFIX). */
  env(role: Role): Record<string, string>
  /**
   * What `fleetstream devices` needs to manage this server's devices: its own copy of
   * infra/nats/devices.conf (NATS_DEVICES_FILE) and its pid file (NATS_PID_FILE).
   */
  devicesEnv(): Record<string, string>
  /** `fleetstream devices add <id> [--mqtt] --json` against this server: the new credential. */
  addDevice(deviceId: string, opts?: { mqtt?: boolean }): Promise<DeviceCredential>
  /** A NATS connection as this device, once the server's reload has taken the new user. */
  connectDevice(c: DeviceCredential, opts?: Partial<ConnectionOptions>): Promise<NatsConnection>
  connect(role: Role, opts?: Partial<ConnectionOptions>): Promise<NatsConnection>
  /** An admin connection and its JetStream manager, as an operator's nats CLI would have. */
  admin(): Promise<{ nc: NatsConnection; jsm: JetStreamManager }>
  cleanup(): Promise<void>
}

export interface RoleNatsServerOptions {
  /** The FLEET account's JetStream file limit in place of accounts.conf's (e.g. `'256KB'`). */
  readonly fleetMaxFile?: string
}

export async function startRoleNatsServer(
  opts: RoleNatsServerOptions = {},
): Promise<RoleNatsServer> {
  const secrets = generateSecrets()
  // A copy of the repository's configs, so that `fleetstream devices` rewrites this server's
  // devices.conf and never the repository's.
  const confDir = await mkdtemp(join(tmpdir(), 'fleetstream-nats-conf-'))
  await mkdir(join(confDir, 'infra', 'nats'), { recursive: true })
  await copyFile(NATS_CONF, join(confDir, 'nats.conf'))
  for (const f of NATS_INCLUDES)
    await copyFile(join(repoRoot, 'infra', 'nats', f), join(confDir, 'infra', 'nats', f))
  if (opts.fleetMaxFile !== undefined) await setFleetMaxFile(confDir, opts.fleetMaxFile)
  const pidFile = join(confDir, 'nats.pid')
  // The flags infra/dev-services.sh passes, with ports of our own; the store under the
  // server's temp dir (its working directory).
  const { server, monitorPort, mqttPort } = await onFreePorts(async () => {
    const [port, monitorPort, mqttPort] = [await freePort(), await freePort(), await freePort()]
    const server = await startNatsServer({
      configFile: join(confDir, 'nats.conf'),
      args: [...['-a', '127.0.0.1', '-p', String(port), '-m', String(monitorPort), '-P', pidFile]],
      env: { ...passwordEnv(secrets), NATS_MQTT_PORT: String(mqttPort), NATS_STORE_DIR: 'js' },
    })
    return { server, monitorPort, mqttPort }
  })
  const url = server.url
  const ns: RoleNatsServer = {
    server,
    url,
    mqttPort,
    monitorUrl: `http://127.0.0.1:${monitorPort}`,
    secrets,
    configDir: confDir,
    env: (role) => roleEnv(secrets, role),
    devicesEnv: () => ({
      NATS_DEVICES_FILE: join(confDir, 'infra', 'nats', 'devices.conf'),
      NATS_PID_FILE: pidFile,
    }),
    connect: (role, opts = {}) =>
      connect({ servers: url, ...roleConnectOptions(secrets, role), ...opts }),
    async admin() {
      const nc = await ns.connect('admin')
      return { nc, jsm: await jetstreamManager(nc) }
    },
    async addDevice(deviceId, opts = {}) {
      const args = ['devices', 'add', deviceId, '--json', ...(opts.mqtt ? ['--mqtt'] : [])]
      const out = await new Promise<string>((resolve, reject) => {
        execFile(
          process.execPath,
          [CLI, ...args],
          { cwd: repoRoot, env: { PATH: process.env.PATH ?? '', ...ns.devicesEnv() } },
          (err, stdout, stderr) => {
            if (err) reject(new HarnessError(`fleetstream ${args.join(' ')}: ${stdout}${stderr}`))
            else resolve(stdout)
          },
        )
      })
      return JSON.parse(out) as DeviceCredential
    },
    async connectDevice(c, opts = {}) {
      // The CLI has sent SIGHUP; the server takes the new user a moment later.
      const deadline = Date.now() + 10_000
      for (;;) {
        try {
          return await connect({
            servers: url,
            user: c.user,
            pass: c.password,
            ...(c.inboxPrefix ? { inboxPrefix: c.inboxPrefix } : {}),
            ...opts,
          })
        } catch (err) {
          if (Date.now() > deadline) throw err
          await new Promise((r) => setTimeout(r, 50))
        }
      }
    },
    async cleanup() {
      await server.cleanup()
      await rm(confDir, { recursive: true, force: true })
    },
  }
  return ns
}

/**
 * Sets the FLEET account's JetStream file limit in the copy of accounts.conf under `configDir`
 * (the first `max_file:` in it is FLEET's); reload the server to apply it.
 */
export async function setFleetMaxFile(configDir: string, limit: string): Promise<void> {
  const file = join(configDir, 'infra', 'nats', 'accounts.conf')
  const text = await readFile(file, 'utf8')
  if (!/max_file: \S+/.test(text)) throw new HarnessError(`no 'max_file:' in ${file}`)
  await writeFile(file, text.replace(/max_file: \S+/, `max_file: ${limit}`))
}
