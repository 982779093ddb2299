import type { Subscription } from '@nats-io/transport-node'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { setTimeout as sleep } from 'node:timers/promises'
import type { Runtime } from '../app/runtime.ts'
import { PublishPipeline } from '../infra/publisher.ts'
import { readCheckpoint } from '../processors/progress/checkpoints.ts'
import { readingsProcessor } from '../processors/readings-processor.ts'
import { startProcessor } from '../processors/runner/runner.ts'
import type { RunningProcessor } from '../processors/runner/types.ts'
import { freshDatabase, startNatsServer, type NatsServer } from './harness/test-servers.ts'
import { readingDraft, testConfig, testPublisher, testRuntime, waitFor } from './fixtures.ts'

/**
 * The stream watch (processors/runner/stream-watch.ts) asks the stream's info every 2 s and reads
 * back what was applied, message by message, when the stream ends below what was delivered. At a
 * steady rate events are delivered between the server's answer and its reading: compared with
 * what was delivered by then, every check looked like a lost tail and read the last seconds back
 * (5-7% of a processor's CPU and thousands of API requests at 1,000 events/s). Events published
 * steadily across several checks must not set it off.
 */
const SECONDS = 7
const PER_TICK = 5
const TICK_MS = 5

let nats: NatsServer
let rt: Runtime
let gets: Subscription | undefined
let processor: RunningProcessor | undefined

beforeAll(async () => {
  nats = await startNatsServer()
  rt = await testRuntime(testConfig(nats.url, await freshDatabase()))
}, 60_000)

afterAll(async () => {
  await processor?.stop()
  gets?.unsubscribe()
  await (rt as Runtime | undefined)?.close()
  await (nats as NatsServer | undefined)?.cleanup()
})

describe('the stream watch of a processor on a steady stream', () => {
  it('reads nothing back while the stream keeps what was applied', async () => {
    // Every message read back from the stream, as any subscriber on the account sees it.
    let readBack = 0
    gets = rt.nc.subscribe(`$JS.API.STREAM.MSG.GET.${rt.config.streams.events}`, {
      callback: () => {
        readBack++
      },
    })
    await rt.nc.flush()
    processor = startProcessor(readingsProcessor, rt)

    const publisher = testPublisher(rt)
    const pipe = new PublishPipeline(64)
    let sent = 0
    const until = Date.now() + SECONDS * 1000
    while (Date.now() < until) {
      for (let i = 0; i < PER_TICK; i++, sent++) {
        await pipe.submit(() => publisher.publish(readingDraft(`steady-${sent % 50}`, sent)))
      }
      await sleep(TICK_MS)
    }
    await pipe.drain()
    const last = (await rt.jsm.streams.info(rt.config.streams.events)).state.last_seq
    await waitFor(
      'the processor to apply every event',
      async () => (await readCheckpoint(rt.db, 'readings')).lastSeq >= last,
    )
    await rt.nc.flush()

    expect(processor.stats.applied).toBe(sent)
    expect(readBack).toBe(0)
  }, 60_000)
})
