import { connect, type NatsConnection } from '@nats-io/transport-node'
import { setTimeout as sleep } from 'node:timers/promises'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startObservability, type Observability } from '../app/observability.ts'
import type { Runtime } from '../app/runtime.ts'
import { createLogger } from '../infra/logger.ts'
import { readingsProcessor } from '../processors/readings-processor.ts'
import { startProcessor } from '../processors/runner/runner.ts'
import type { RunningProcessor } from '../processors/runner/types.ts'
import { freshDatabase, startNatsServer, type NatsServer } from './harness/test-servers.ts'
import { testConfig, testRuntime, waitFor } from './fixtures.ts'

/**
 * The lag figures of /metrics (app/observability.ts) read consumer infos from the JetStream API,
 * which nats-server 2.9 answers one request at a time. While the server answers late, a process
 * keeps one read in flight, not one more per refresh: a queue that grows faster than the server
 * drains it would hold up every other JetStream request of the fleet.
 */
describe('the lag figures of a busy server', () => {
  let nats: NatsServer
  let rt: Runtime
  let obs: Observability
  let processor: RunningProcessor
  let snoop: NatsConnection
  beforeAll(async () => {
    nats = await startNatsServer()
    const config = testConfig(nats.url, await freshDatabase(), {
      METRICS_PORT: '0',
      METRICS_HOST: '127.0.0.1',
      METRICS_REFRESH_SECONDS: '1',
    })
    rt = await testRuntime(config)
    const log = createLogger({ level: 'silent', name: 'test' })
    obs = await startObservability(config, log, 'test-lag')
    await obs.attach(rt)
    processor = startProcessor(readingsProcessor, { ...rt, metrics: obs.metrics })
    snoop = await connect({ servers: nats.url })
  }, 60_000)
  afterAll(async () => {
    await processor.stop()
    await obs.close()
    await snoop.close()
    await rt.close()
    await nats.cleanup()
  })

  it('asks again only once the last read is answered', async () => {
    // Every consumer info request on the stream, as any subscriber on the account sees it.
    const asked: number[] = []
    snoop.subscribe(`$JS.API.CONSUMER.INFO.${rt.config.streams.events}.readings`, {
      callback: () => {
        asked.push(Date.now())
      },
    })
    await snoop.flush()
    await waitFor('the lag figures to be read', () => Promise.resolve(asked.length >= 2), 20_000)

    // The server answers nothing for 6 refreshes, then all it was asked at once.
    process.kill(nats.pid, 'SIGSTOP')
    const stopped = Date.now()
    await sleep(6000)
    process.kill(nats.pid, 'SIGCONT')
    await sleep(500)
    await snoop.flush()
    const during = asked.filter((t) => t >= stopped).length
    // The read in flight when it stopped, and the one sent once that was answered.
    expect(during).toBeGreaterThanOrEqual(1)
    expect(during).toBeLessThanOrEqual(2)
  }, 60_000)
})
