import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { PublishPipeline } from '../infra/publisher.ts'
import type { Runtime } from '../app/runtime.ts'
import { startProcessor } from '../processors/runner/runner.ts'
import { type RunningProcessor } from '../processors/runner/types.ts'
import { readingsProcessor } from '../processors/readings-processor.ts'
import {
  startNatsServer,
  startPostgres,
  type NatsServer,
  type PgCluster,
} from './harness/test-servers.ts'
import { readingDraft, testConfig, testPublisher, testRuntime, waitFor } from './fixtures.ts'

describe('a Postgres outage', () => {
  let nats: NatsServer
  let pg: PgCluster
  let rt: Runtime
  let processor: RunningProcessor
  beforeAll(async () => {
    nats = await startNatsServer()
    pg = await startPostgres() // its own cluster: this test stops it
    rt = await testRuntime(testConfig(nats.url, await pg.createDatabase()))
    processor = startProcessor(readingsProcessor, rt)
  })
  afterAll(async () => {
    await processor.stop()
    await rt.close()
    await pg.cleanup()
    await nats.cleanup()
  })

  const count = async () => {
    const r = await rt.db
      .selectFrom('readings')
      .select((eb) => eb.fn.countAll<number>().as('n'))
      .executeTakeFirstOrThrow()
    return r.n
  }

  it('loses nothing, parks nothing, and resumes from the checkpoint when it returns', async () => {
    const publisher = testPublisher(rt)
    const publish = async (n: number) => {
      const pipe = new PublishPipeline(256)
      for (let i = 0; i < n; i++)
        await pipe.submit(() => publisher.publish(readingDraft(`s-${i % 40}`, i)))
      await pipe.drain()
    }
    await publish(2000)
    await waitFor('the first 2,000 events', () => processor.stats.checkpoint === 2000)

    await pg.stop('immediate')
    await publish(3000) // ingest goes on while the read models are down
    await waitFor(
      'the circuit breaker to open: the processor stops fetching',
      () => processor.stats.state === 'backing-off' && processor.stats.postgres === 'open',
      30_000,
    )
    await new Promise((r) => setTimeout(r, 3000))
    await pg.start()

    await waitFor(
      'the processor to catch up after the outage',
      () => processor.stats.checkpoint === 5000,
      60_000,
      () => JSON.stringify(processor.stats),
    )
    expect(await count()).toBe(5000)
    expect(processor.stats.postgres).toBe('closed')
    expect((await rt.jsm.streams.info(rt.config.streams.dlq)).state.messages).toBe(0)
    expect(processor.stats.rejected).toBe(0)
  })
})
