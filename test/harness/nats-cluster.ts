import { execFile } from 'node:child_process'
import { copyFile, mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { jetstreamManager } from '@nats-io/jetstream'
import { connect, type ConnectionOptions, type NatsConnection } from '@nats-io/transport-node'
import { setTimeout as sleep } from 'node:timers/promises'
import type { DeviceCredential } from '../../cli/commands/devices-command.ts'
import { startNatsServer, type NatsServer } from '../../testbed/nats-server.ts'
import {
  generateSecrets,
  passwordEnv,
  repoRoot,
  roleConnectOptions,
  roleEnv,
  type Role,
  type RoleSecrets,
} from './nats-roles.ts'
import { freePort, HarnessError, onFreePorts } from '../../testbed/processes.ts'

/** The node names of the cluster, as in infra/docker-compose.yml. */
export const CLUSTER_NODES = ['n1', 'n2', 'n3'] as const

/** The ports one node listens on. */
export interface NodePorts {
  readonly client: number
  readonly http: number
  readonly cluster: number
  readonly mqtt: number
}

/**
 * The environment of one node for infra/nats/cluster-node.conf: the same variables
 * docker compose sets (test/compose.int.test.ts checks that), with loopback addresses.
 */
export function clusterNodeEnv(
  index: number,
  ports: readonly NodePorts[],
  secrets: RoleSecrets,
): Record<string, string> {
  const own = ports[index]!
  const route = (p: NodePorts) =>
    `nats-route://route:${secrets.routePassword}@127.0.0.1:${p.cluster}`
  return {
    NATS_SERVER_NAME: CLUSTER_NODES[index]!,
    NATS_LISTEN: `127.0.0.1:${own.client}`,
    NATS_HTTP: `127.0.0.1:${own.http}`,
    NATS_CLUSTER_LISTEN: `127.0.0.1:${own.cluster}`,
    NATS_ROUTE_PASSWORD: secrets.routePassword,
    NATS_ROUTE_1: route(ports[0]!),
    NATS_ROUTE_2: route(ports[1]!),
    NATS_ROUTE_3: route(ports[2]!),
    NATS_MQTT_HOST: '127.0.0.1',
    NATS_MQTT_PORT: String(own.mqtt),
    // Relative to the server's working directory, its temp dir.
    NATS_STORE_DIR: 'js',
    ...passwordEnv(secrets),
  }
}

/**
 * The 3-node JetStream cluster of docker compose, on loopback: each node is nats-server with
 * the repository's infra/nats/cluster-node.conf (roles, limits, MQTT, route authorization), its
 * own store and random ports. R3 streams survive one node being killed and restarted.
 *
 * @example
 * const cluster = await startNatsCluster()
 * const nc = await cluster.connect('admin')
 * await cluster.servers[0].kill('SIGKILL'); await cluster.servers[0].restart()
 */
export interface NatsCluster {
  readonly servers: readonly NatsServer[]
  /** `n1`, `n2`, `n3`: the server names, in the order of `servers`. */
  readonly names: readonly string[]
  readonly ports: readonly NodePorts[]
  /** Every client URL. */
  readonly urls: readonly string[]
  /** The URLs comma-joined, as NATS_URL takes them. */
  readonly url: string
  readonly secrets: RoleSecrets
  /** The credentials of the devices asked for in {@link NatsClusterOptions.devices}, by id. */
  readonly devices: Readonly<Record<string, DeviceCredential>>
  /** Environment of a fleetstream process in `role` (NATS_USER, NATS_PASSWORD, NATS_INBOX_PREFIX). */
  env(role: Role): Record<string, string>
  connect(role: Role, opts?: Partial<ConnectionOptions>): Promise<NatsConnection>
  /** A NATS connection as one of {@link devices} (a NATS device, in the DEVICES account). */
  connectDevice(deviceId: string, opts?: Partial<ConnectionOptions>): Promise<NatsConnection>
  /** Resolves once JetStream has a meta leader and every server is routed. */
  ready(timeoutMs?: number): Promise<void>
  cleanup(): Promise<void>
}

export interface NatsClusterOptions {
  /**
   * Devices with credentials of their own (`fleetstream devices add <id> [--mqtt]`), written into
   * a copy of infra/nats/devices.conf before the nodes start: NATS devices in the DEVICES account,
   * MQTT devices in MQTT_DEVICES.
   */
  readonly devices?: readonly { readonly id: string; readonly mqtt?: boolean }[]
}

export async function startNatsCluster(opts: NatsClusterOptions = {}): Promise<NatsCluster> {
  const secrets = generateSecrets()
  // A copy of infra/nats/, so that `fleetstream devices add` writes the cluster's devices.conf
  // and never the repository's.
  const confDir = await mkdtemp(join(tmpdir(), 'fleetstream-cluster-conf-'))
  try {
    for (const f of ['cluster-node.conf', 'limits.conf', 'accounts.conf', 'devices.conf'])
      await copyFile(join(repoRoot, 'infra', 'nats', f), join(confDir, f))
    const devices: Record<string, DeviceCredential> = {}
    for (const d of opts.devices ?? []) devices[d.id] = await addDevice(confDir, d.id, d.mqtt)
    return await onFreePorts(() => startOnFreePorts(secrets, confDir, devices))
  } catch (err) {
    await rm(confDir, { recursive: true, force: true })
    throw err
  }
}

/** The built CLI (test/harness/global-setup.ts builds it). */
const CLI = fileURLToPath(new URL('../../dist/cli/fleetstream.js', import.meta.url))

/** `fleetstream devices add <id> [--mqtt] --json` on the devices.conf in `confDir`. */
function addDevice(confDir: string, id: string, mqtt = false): Promise<DeviceCredential> {
  const args = ['devices', 'add', id, '--json', ...(mqtt ? ['--mqtt'] : [])]
  return new Promise((resolve, reject) => {
    execFile(
      process.execPath,
      [CLI, ...args],
      {
        cwd: repoRoot,
        env: { PATH: process.env.PATH ?? '', NATS_DEVICES_FILE: join(confDir, 'devices.conf') },
      },
      (err, stdout, stderr) => {
        if (err) reject(new HarnessError(`fleetstream ${args.join(' ')}: ${stdout}${stderr}`))
        else resolve(JSON.parse(stdout) as DeviceCredential)
      },
    )
  })
}

async function startOnFreePorts(
  secrets: RoleSecrets,
  confDir: string,
  devices: Record<string, DeviceCredential>,
): Promise<NatsCluster> {
  const ports: NodePorts[] = []
  for (let i = 0; i < CLUSTER_NODES.length; i++) {
    ports.push({
      client: await freePort(),
      http: await freePort(),
      cluster: await freePort(),
      mqtt: await freePort(),
    })
  }
  const servers: NatsServer[] = []
  try {
    for (let i = 0; i < CLUSTER_NODES.length; i++) {
      servers.push(
        await startNatsServer({
          configFile: join(confDir, 'cluster-node.conf'),
          env: clusterNodeEnv(i, ports, secrets),
        }),
      )
    }
  } catch (err) {
    await Promise.all(servers.map((s) => s.cleanup()))
    throw err
  }
  const urls = servers.map((s) => s.url)
  const connectAs = (role: Role, opts: Partial<ConnectionOptions> = {}) =>
    connect({ servers: [...urls], ...roleConnectOptions(secrets, role), ...opts })
  const cluster: NatsCluster = {
    servers,
    names: [...CLUSTER_NODES],
    ports,
    urls,
    url: urls.join(','),
    secrets,
    devices,
    env: (role) => roleEnv(secrets, role),
    connect: connectAs,
    connectDevice(deviceId, opts = {}) {
      const c = devices[deviceId]
      if (c === undefined) throw new HarnessError(`no device '${deviceId}' in this cluster`)
      return connect({
        servers: [...urls],
        user: c.user,
        pass: c.password,
        ...(c.inboxPrefix ? { inboxPrefix: c.inboxPrefix } : {}),
        ...opts,
      })
    },
    async ready(timeoutMs = 30_000) {
      const deadline = Date.now() + timeoutMs
      let last: unknown
      while (Date.now() < deadline) {
        const nc = await connectAs('admin').catch((e: unknown) => {
          last = e
          return undefined
        })
        if (nc) {
          try {
            const jsm = await jetstreamManager(nc)
            await jsm.getAccountInfo() // answers only once there is a meta leader
            return
          } catch (e) {
            last = e // no meta leader yet
          } finally {
            await nc.close()
          }
        }
        await sleep(250)
      }
      throw new HarnessError(
        `JetStream cluster (${CLUSTER_NODES.join(', ')}) not ready within ${timeoutMs} ms: ${String(last)}`,
      )
    },
    async cleanup() {
      await Promise.all(servers.map((s) => s.cleanup()))
      await rm(confDir, { recursive: true, force: true })
    },
  }
  await cluster.ready()
  return cluster
}
