import { jetstreamManager } from '@nats-io/jetstream'
import { connect } from '@nats-io/transport-node'
import { setTimeout as sleep } from 'node:timers/promises'
import { startNatsServer, type NatsServer } from './nats-server.ts'
import { freePort, HarnessError } from './processes.ts'

/**
 * A throwaway JetStream cluster of nats-servers on loopback, routed to each other, each with
 * its own store: R3 streams survive one node being killed and restarted.
 *
 * @example
 * const cluster = await startNatsCluster(3)
 * const nc = await connect({ servers: cluster.urls })
 * await cluster.servers[0].kill('SIGKILL'); await cluster.servers[0].restart()
 */
export interface NatsCluster {
  readonly servers: readonly NatsServer[]
  /** Every client URL. */
  readonly urls: readonly string[]
  /** The URLs comma-joined, as NATS_URL takes them. */
  readonly url: string
  /** Resolves once JetStream has a meta leader and every server is routed. */
  ready(timeoutMs?: number): Promise<void>
  cleanup(): Promise<void>
}

export async function startNatsCluster(size = 3): Promise<NatsCluster> {
  const name = `fleet-${Math.random().toString(16).slice(2, 8)}`
  const routePorts: number[] = []
  for (let i = 0; i < size; i++) routePorts.push(await freePort())
  const routes = routePorts.map((p) => `nats-route://127.0.0.1:${p}`)
  const servers: NatsServer[] = []
  try {
    for (let i = 0; i < size; i++) {
      servers.push(
        await startNatsServer({
          serverName: `${name}-n${i + 1}`,
          extraConfig: [
            'cluster {',
            `  name: ${name}`,
            `  listen: 127.0.0.1:${routePorts[i]!}`,
            `  routes: [${routes.filter((_, j) => j !== i).join(', ')}]`,
            '}',
          ].join('\n'),
        }),
      )
    }
  } catch (err) {
    await Promise.all(servers.map((s) => s.cleanup()))
    throw err
  }
  const urls = servers.map((s) => s.url)
  const cluster: NatsCluster = {
    servers,
    urls,
    url: urls.join(','),
    async ready(timeoutMs = 30_000) {
      const deadline = Date.now() + timeoutMs
      let last: unknown
      while (Date.now() < deadline) {
        const nc = await connect({ servers: [...urls] }).catch((e: unknown) => {
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
        `JetStream cluster ${name} not ready within ${timeoutMs} ms: ${String(last)}`,
      )
    },
    async cleanup() {
      await Promise.all(servers.map((s) => s.cleanup()))
    },
  }
  await cluster.ready()
  return cluster
}
