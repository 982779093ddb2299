import { connect, type NatsConnection } from '@nats-io/transport-node'
import { setTimeout as sleep } from 'node:timers/promises'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startObservability, type Observability } from '../app/observability.ts'
import type { Runtime } from '../app/runtime.ts'
import { createLogger } from '../infra/logger.ts'
import { PublishPipeline } from '../infra/publisher.ts'
import { readingsProcessor } from '../processors/readings-processor.ts'
import { startProcessor } from '../processors/runner/runner.ts'
import type { RunningProcessor } from '../processors/runner/types.ts'
import { freshDatabase, startNatsServer, type NatsServer } from './harness/test-servers.ts'
import { readingDraft, testConfig, testPublisher, testRuntime, waitFor } from './fixtures.ts'

/** A readings processor on a server of its own, its figures refreshed every second. */
interface Site {
  nats: NatsServer
  rt: Runtime
  obs: Observability
  processor: RunningProcessor
  /** A connection of its own, to see the requests of the processor's connection. */
  snoop: NatsConnection
}

/** Starts a {@link Site} before the suite and stops it after. */
function site(): Site {
  const s = {} as Site
  beforeAll(async () => {
    s.nats = await startNatsServer()
    const config = testConfig(s.nats.url, await freshDatabase(), {
      METRICS_PORT: '0',
      METRICS_HOST: '127.0.0.1',
      METRICS_REFRESH_SECONDS: '1',
    })
    s.rt = await testRuntime(config)
    s.obs = await startObservability(config, createLogger({ level: 'silent', name: 'test' }), 'lag')
    await s.obs.attach(s.rt)
    s.processor = startProcessor(readingsProcessor, { ...s.rt, metrics: s.obs.metrics })
    s.snoop = await connect({ servers: s.nats.url })
  }, 60_000)
  afterAll(async () => {
    await s.processor.stop()
    await s.obs.close()
    await s.snoop.close()
    await s.rt.close()
    await s.nats.cleanup()
  })
  return s
}

/**
 * When each consumer info request for the readings consumer was sent, as any subscriber on the
 * account sees them, from now on.
 */
async function consumerInfoRequests(s: Site): Promise<number[]> {
  const asked: number[] = []
  s.snoop.subscribe(`$JS.API.CONSUMER.INFO.${s.rt.config.streams.events}.readings`, {
    callback: () => {
      asked.push(Date.now())
    },
  })
  await s.snoop.flush()
  return asked
}

/**
 * The lag figures of /metrics (app/observability.ts) read consumer infos from the JetStream API,
 * which nats-server 2.9 answers one request at a time. While the server answers late, a process
 * keeps one read in flight, not one more per refresh: a queue that grows faster than the server
 * drains it would hold up every other JetStream request of the fleet.
 */
describe('the lag figures of a busy server', () => {
  const s = site()

  it('asks again only once the last read is answered', async () => {
    const asked = await consumerInfoRequests(s)
    await waitFor('the lag figures to be read', () => Promise.resolve(asked.length >= 2), 20_000)

    // The server answers nothing for 6 refreshes, then all it was asked at once.
    process.kill(s.nats.pid, 'SIGSTOP')
    const stopped = Date.now()
    await sleep(6000)
    process.kill(s.nats.pid, 'SIGCONT')
    await sleep(500)
    await s.snoop.flush()
    const during = asked.filter((t) => t >= stopped).length
    // The read in flight when it stopped, and the one sent once that was answered.
    expect(during).toBeGreaterThanOrEqual(1)
    expect(during).toBeLessThanOrEqual(2)
  }, 60_000)
})

/**
 * A slot receiving events knows its consumer's counts from its deliveries (each carries the
 * consumer's num_pending), so the lag figures ask the server only for a consumer that has been
 * quiet: on nats-server 2.9 the info of a partition's consumer costs ~40 ms of the server's CPU on a
 * 200k-event stream.
 */
describe('the lag figures of a slot receiving events', () => {
  const s = site()

  it('reads them from the deliveries while events come, and from the server once quiet', async () => {
    const asked = await consumerInfoRequests(s)
    const publisher = testPublisher(s.rt)
    const pipe = new PublishPipeline(16)
    const trickle = { on: true, sent: 0 }
    const publishing = (async () => {
      while (trickle.on) {
        await pipe.submit(() =>
          publisher.publish(readingDraft(`lag-${trickle.sent % 7}`, trickle.sent)),
        )
        trickle.sent++
        await sleep(20)
      }
      await pipe.drain()
    })()
    await waitFor('the first events to be applied', () => s.processor.stats.applied > 0)
    await sleep(2500) // a read sent before the first delivery has been answered
    const from = Date.now()
    await sleep(4000) // four refreshes, events arriving all along
    const whileReceiving = asked.filter((t) => t >= from).length
    const scrape = await (await fetch(`${s.obs.url ?? ''}/metrics`)).text()
    trickle.on = false
    await publishing

    await waitFor('every event to be applied', () => s.processor.stats.applied === trickle.sent)
    const quiet = Date.now()
    await sleep(4000) // past the refresh that last saw a delivery, and the one after it
    await s.snoop.flush()
    const whileQuiet = asked.filter((t) => t >= quiet).length

    expect(whileReceiving).toBe(0)
    expect(scrape).toMatch(/^fleetstream_consumer_pending_messages\{processor="readings"\} \d+$/m)
    expect(scrape).toMatch(
      /^fleetstream_consumer_ack_pending_messages\{processor="readings"\} \d+$/m,
    )
    expect(whileQuiet).toBeGreaterThanOrEqual(1)
  }, 60_000)
})
