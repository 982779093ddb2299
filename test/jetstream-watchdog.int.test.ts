import { mkdtemp, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { connect, type NatsConnection } from '@nats-io/transport-node'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { createLogger } from '../infra/logger.ts'
import { keepJetStreamReachable } from '../infra/nats.ts'
import { setTimeout as sleep } from 'node:timers/promises'
import { startNatsServer, type NatsServer } from '../testbed/nats-server.ts'

/**
 * The JetStream watchdog (infra/nats.ts keepJetStreamReachable) moves a connection to another
 * server only when there is one and this one does not serve JetStream: a reconnect drops every
 * pull in flight, and their messages come back only after the ack wait.
 */
describe('the JetStream watchdog', () => {
  let plain: NatsServer // no JetStream: every JetStream request gets no responders
  let js: NatsServer
  beforeAll(async () => {
    const dir = await mkdtemp(join(tmpdir(), 'fleetstream-plain-'))
    const configFile = join(dir, 'plain.conf')
    await writeFile(configFile, 'host: 127.0.0.1\nport: -1\n')
    ;[plain, js] = await Promise.all([startNatsServer({ configFile }), startNatsServer()])
  })
  afterAll(async () => {
    await Promise.all([plain.cleanup(), js.cleanup()])
  })

  /** Runs the watchdog for `ms` on a connection to `servers` (in that order); its reconnects. */
  async function watch(
    servers: string[],
    ms: number,
    onConnected: (nc: NatsConnection) => void = () => undefined,
  ): Promise<{ reconnects: number; server: string }> {
    const nc = await connect({ servers, noRandomize: true, maxReconnectAttempts: -1 })
    onConnected(nc)
    let reconnects = 0
    void (async () => {
      for await (const s of nc.status())
        if (s.type === 'reconnect') {
          reconnects++
          console.log('reconnect', s.server, nc.getServer())
        }
    })()
    const stop = new AbortController()
    const watchdog = keepJetStreamReachable(nc, {
      log: createLogger({ level: 'silent', name: 'test' }),
      signal: stop.signal,
      servers,
      everyMs: 100,
      patienceMs: 600,
    })
    await sleep(ms)
    stop.abort()
    await watchdog
    const server = nc.getServer()
    await nc.close()
    return { reconnects, server }
  }

  it('moves to another server when this one does not serve JetStream', async () => {
    const r = await watch([plain.url, js.url], 3000)
    // The client may pick the server it left first (nats.js does not skip it), then the other.
    expect(r.reconnects).toBeGreaterThanOrEqual(1)
    expect(r.reconnects).toBeLessThanOrEqual(2)
    expect(r.server).toBe(`127.0.0.1:${js.port}`)
  })

  it('stays on the only server it knows, though it does not serve JetStream', async () => {
    const r = await watch([plain.url], 3000)
    expect(r.reconnects).toBe(0)
  })

  it('stays while JetStream answers slowly: a busy API queue is no outage', async () => {
    // Answers of the account info probe held back, as a server busy with a queue of
    // consumer infos would: each comes within the patience, none within a tenth of it.
    const r = await watch([plain.url, js.url], 3000, (nc) => {
      nc.subscribe('$JS.API.INFO', {
        callback: (_err, msg) => {
          setTimeout(() => {
            msg.respond(
              JSON.stringify({
                type: 'io.nats.jetstream.api.v1.account_info_response',
                memory: 0,
                storage: 0,
                streams: 0,
                consumers: 0,
                limits: {},
                api: { total: 0, errors: 0 },
              }),
            )
          }, 400)
        },
      })
    })
    expect(r.reconnects).toBe(0)
    expect(r.server).toBe(`127.0.0.1:${plain.port}`)
  })
})
