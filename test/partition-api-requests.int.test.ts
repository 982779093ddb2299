import type { Subscription } from '@nats-io/transport-node'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Runtime } from '../app/runtime.ts'
import { PublishPipeline } from '../infra/publisher.ts'
import { slotsOf } from '../processors/partitions.ts'
import { readCheckpointSeqs } from '../processors/progress/checkpoints.ts'
import { readingsProcessor } from '../processors/readings-processor.ts'
import { startProcessor } from '../processors/runner/runner.ts'
import type { RunningProcessor } from '../processors/runner/types.ts'
import { partitionMapping } from '../schemas/subjects.ts'
import { freshDatabase, startNatsServer, type NatsServer } from './harness/test-servers.ts'
import { readingDraft, testConfig, testPublisher, testRuntime, waitFor } from './fixtures.ts'

/**
 * nats-server 2.9 answers JetStream API requests one at a time, and the info of a partition's
 * consumer (its num_pending over a filtered subject) is among the dearest of them: every one a
 * slot session asks queues the requests of every other slot and instance. A slot session asks it
 * once, to anchor its consumer at the checkpoint, and consumes without asking again.
 */
const PARTITIONS = 4
const EVENTS = 400

let nats: NatsServer
let rt: Runtime
let infos: Subscription | undefined
const running: RunningProcessor[] = []

beforeAll(async () => {
  const m = partitionMapping(PARTITIONS)
  nats = await startNatsServer({
    extraConfig: `mappings: { ${JSON.stringify(m.from)}: ${JSON.stringify(m.to)} }`,
  })
  rt = await testRuntime(
    testConfig(nats.url, await freshDatabase(), { FLEET_PARTITIONS: String(PARTITIONS) }),
  )
}, 60_000)

afterAll(async () => {
  await Promise.all(running.map((p) => p.stop()))
  infos?.unsubscribe()
  await (rt as Runtime | undefined)?.close()
  await (nats as NatsServer | undefined)?.cleanup()
})

describe('the JetStream API requests of a partitioned processor', () => {
  it('asks for each slot consumer’s info once per session, to anchor it', async () => {
    const pipe = new PublishPipeline(64)
    const publisher = testPublisher(rt)
    for (let i = 0; i < EVENTS; i++) {
      await pipe.submit(() => publisher.publish(readingDraft(`api-${i % 40}`, i)))
    }
    await pipe.drain()

    // Every consumer info request on the stream, as any subscriber on the account sees it.
    const asked = new Map<string, number>()
    infos = rt.nc.subscribe(`$JS.API.CONSUMER.INFO.${rt.config.streams.events}.*`, {
      callback: (_err, msg) => {
        const name = msg.subject.split('.').at(-1) ?? ''
        asked.set(name, (asked.get(name) ?? 0) + 1)
      },
    })
    await rt.nc.flush()

    const processor = startProcessor(readingsProcessor, rt)
    running.push(processor)
    const slots = slotsOf(readingsProcessor, rt.config).map((s) => s.key)
    const targets = new Map<string, number>()
    for (const s of slotsOf(readingsProcessor, rt.config)) {
      const m = await rt.jsm.streams.getMessage(rt.config.streams.events, {
        last_by_subj: s.filterSubject,
      })
      targets.set(s.key, m?.seq ?? 0)
    }
    await waitFor('every slot to checkpoint the last event of its partition', async () => {
      const at = await readCheckpointSeqs(rt.db, slots)
      return slots.every((k) => (at.get(k) ?? 0) >= (targets.get(k) ?? 0))
    })
    await rt.nc.flush()

    // One session per slot (none failed), each asking once.
    expect(processor.stats.retries).toBe(0)
    expect(Object.fromEntries(asked)).toEqual(Object.fromEntries(slots.map((k) => [k, 1])))
  }, 60_000)
})
