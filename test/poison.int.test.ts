import { headers } from '@nats-io/transport-node'
import { sql } from 'kysely'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import type { Runtime } from '../app/runtime.ts'
import { PublishPipeline } from '../infra/publisher.ts'
import { startProcessor } from '../processors/runner/runner.ts'
import { type ProcessorSpec, type RunningProcessor } from '../processors/runner/types.ts'
import { originalHeaders } from '../processors/dlq/park.ts'
import { readingsProcessor } from '../processors/readings-processor.ts'
import type { ProjectedEvent } from '../projections/projection.ts'
import { encodeHlc } from '../schemas/hlc.ts'
import { Headers } from '../schemas/subjects.ts'
import { freshDatabase, startNatsServer, type NatsServer } from './harness/test-servers.ts'
import { readingDraft, testConfig, testPublisher, testRuntime, waitFor } from './fixtures.ts'

/** The readings processor with a handler bug: it throws on every event `bad` picks. */
function buggyReadings(bad: (e: ProjectedEvent) => boolean): ProcessorSpec {
  const base = readingsProcessor.projection
  return {
    ...readingsProcessor,
    projection: {
      ...base,
      async apply(trx, events) {
        const hit = events.find(bad)
        if (hit) throw new TypeError(`cannot apply reading ${hit.event.eventId}`)
        await base.apply(trx, events)
      },
    },
  }
}

describe('poison', () => {
  let nats: NatsServer
  let rt: Runtime
  let processor: RunningProcessor | undefined
  beforeEach(async () => {
    nats = await startNatsServer()
    rt = await testRuntime(
      testConfig(nats.url, await freshDatabase(), { PROCESSOR_BATCH_SIZE: '64' }),
    )
  })
  afterEach(async () => {
    await processor?.stop()
    await rt.close()
    await nats.cleanup()
  })

  /** Puts back the `readings` table a test renamed away, then waits for the checkpoint at `last`. */
  const tableBackThenCaughtUp = async (last: number) => {
    await sql`alter table readings_moved rename to readings`.execute(rt.db)
    await waitFor(
      'the checkpoint to pass every event',
      () => processor!.stats.checkpoint === last,
      60_000,
    )
  }
  const rows = async () =>
    (await rt.db.selectFrom('readings').select('value').orderBy('value').execute()).map(
      (r) => r.value,
    )

  it('a handler that fails on one event every time: the batch is split, the event parked with its story, the rest applied', async () => {
    processor = startProcessor(
      buggyReadings((e) => e.event.type === 'reading.recorded' && e.event.data.value === 666),
      rt,
    )
    const publisher = testPublisher(rt)
    const pipe = new PublishPipeline(64)
    let poison = { eventId: '', seq: 0 }
    for (let i = 0; i < 300; i++) {
      const value = i === 150 ? 666 : i
      await pipe.submit(async () => {
        const r = await publisher.publish(readingDraft('p-1', value))
        if (value === 666) poison = { eventId: r.event.eventId, seq: r.seq }
        return r
      })
    }
    await pipe.drain()
    await waitFor(
      'the checkpoint to pass every event',
      () => processor!.stats.checkpoint === 300,
      30_000,
      () => JSON.stringify(processor!.stats),
    )

    const values = await rows()
    expect(values).toHaveLength(299)
    expect(values).not.toContain(666)
    expect(processor.stats).toMatchObject({ poisoned: 1, rejected: 1 })

    const m = await rt.jsm.streams.getMessage(rt.config.streams.dlq, { seq: 1 })
    expect(m?.subject).toBe('fleet.dlq.readings')
    expect({
      processor: m?.header.get(Headers.DlqProcessor),
      reason: m?.header.get(Headers.DlqReason),
      attempts: m?.header.get(Headers.DlqAttempts),
      subject: m?.header.get(Headers.DlqSubject),
      seq: m?.header.get(Headers.DlqStreamSeq),
      msgId: m?.header.get(Headers.DlqKey),
      hlc: m && originalHeaders(m.header).find(([k]) => k === Headers.Hlc)?.[1],
    }).toEqual({
      processor: 'readings',
      reason: 'handler-failed',
      attempts: '3',
      subject: 'fleet.events.p-1.reading',
      seq: String(poison.seq),
      msgId: poison.eventId,
      hlc: expect.stringMatching(/^\d{13}-/) as string,
    })
    expect(m?.header.get(Headers.DlqDetail)).toContain(
      `TypeError: cannot apply reading ${poison.eventId}`,
    )

    // Terminated and acked: nothing is left in flight on the consumer.
    const info = await rt.jsm.consumers.info(rt.config.streams.events, 'readings')
    expect({
      ackPending: info.num_ack_pending,
      pending: info.num_pending,
      floor: info.ack_floor.stream_seq,
    }).toEqual({
      ackPending: 0,
      pending: 0,
      floor: 300,
    })
  })

  it('a projection that fails on everything is systemic: it backs off after ten parked events instead of emptying the stream into the DLQ', async () => {
    processor = startProcessor(
      buggyReadings(() => true),
      rt,
    )
    const publisher = testPublisher(rt)
    for (let i = 0; i < 40; i++) await publisher.publish(readingDraft('p-2', i))
    await waitFor(
      'the processor to back off',
      () => processor!.stats.state === 'backing-off' && processor!.stats.poisoned === 10,
    )
    await new Promise((r) => setTimeout(r, 1500))
    expect(processor.stats.poisoned).toBe(10)
    expect((await rt.jsm.streams.info(rt.config.streams.dlq)).state.messages).toBe(10)
    expect(await rows()).toEqual([])
  })

  it('a handler bug and values Postgres refuses in one batch: each parked once with its own reason, the rest applied', async () => {
    await sql`alter table readings add constraint readings_above_absolute_zero
                check (metric <> 'temperature' or value >= -273.15)`.execute(rt.db)
    processor = startProcessor(
      buggyReadings((e) => e.event.type === 'reading.recorded' && e.event.data.value === 666),
      rt,
    )
    const publisher = testPublisher(rt)
    const pipe = new PublishPipeline(64)
    let last = 0
    for (let i = 0; i < 100; i++) {
      const value = i === 40 ? 666 : i % 20 === 7 ? -300 : i
      await pipe.submit(async () => {
        const r = await publisher.publish(readingDraft('p-5', value))
        last = Math.max(last, r.seq)
        return r
      })
    }
    await pipe.drain()
    await waitFor('the checkpoint to pass every event', () => processor!.stats.checkpoint === last)
    const reasons: string[] = []
    const depth = (await rt.jsm.streams.info(rt.config.streams.dlq)).state.last_seq
    for (let seq = 1; seq <= depth; seq++) {
      const m = await rt.jsm.streams.getMessage(rt.config.streams.dlq, { seq })
      reasons.push(m!.header.get(Headers.DlqReason))
    }
    expect(reasons.sort()).toEqual([
      'handler-failed',
      ...Array.from({ length: 5 }, () => 'storage-refused'),
    ])
    expect(await rows()).toHaveLength(94)
    expect(processor.stats).toMatchObject({ poisoned: 1, rejected: 6 })
  })

  it('a projection whose table is gone (42P01) is broken, not fed poison: nothing is parked, everything applied once the table is back', async () => {
    await sql`alter table readings rename to readings_moved`.execute(rt.db)
    processor = startProcessor(readingsProcessor, rt)
    const publisher = testPublisher(rt)
    let last = 0
    for (let i = 0; i < 20; i++) last = (await publisher.publish(readingDraft('p-4', i))).seq
    await waitFor(
      'the processor to fail on the missing table',
      () => processor!.stats.retries > 0 || processor!.stats.state === 'backing-off',
    )
    expect(processor.stats.rejected).toBe(0)
    await tableBackThenCaughtUp(last)
    expect(await rows()).toHaveLength(20)
    expect((await rt.jsm.streams.info(rt.config.streams.dlq)).state.messages).toBe(0)
  }, 90_000)

  it('an event parked again by a later session (its batch never committed) is in the DLQ once, and counted once', async () => {
    await sql`alter table readings rename to readings_moved`.execute(rt.db)
    processor = startProcessor(readingsProcessor, rt)
    const h = headers()
    h.set(Headers.Hlc, encodeHlc({ wallMs: Date.now(), logical: 0, node: 'gw' }))
    await rt.js.publish('fleet.events.p-6.reading', '{"not": json', {
      msgID: 'garbage-1',
      headers: h,
    })
    const publisher = testPublisher(rt)
    let last = 0
    for (let i = 0; i < 5; i++) last = (await publisher.publish(readingDraft('p-6', i))).seq
    // Parked before the commit, which fails until the table is back: each session that gives up
    // leaves the batch unacked, and the next one takes it again and parks the garbage again.
    await waitFor(
      'a second session to take the batch again',
      () => processor!.stats.received >= 12,
      60_000,
      () => JSON.stringify(processor!.stats),
    )
    await tableBackThenCaughtUp(last)
    expect(await rows()).toHaveLength(5)
    expect((await rt.jsm.streams.info(rt.config.streams.dlq)).state.messages).toBe(1)
    expect(processor.stats.rejected).toBe(1)
  }, 150_000)

  it('an event with an HLC beyond max offset is quarantined and moves no state and no clock', async () => {
    processor = startProcessor(readingsProcessor, rt)
    const publisher = testPublisher(rt)
    const good = await publisher.publish(readingDraft('p-3', 20))
    await waitFor('the good reading', () => processor!.stats.checkpoint === good.seq)
    const future = encodeHlc({ wallMs: Date.now() + 60_000, logical: 0, node: 'rogue-gw' })
    const skewed = { ...publisher.stamp(readingDraft('p-3', 99)), hlc: future }
    const h = headers()
    h.set(Headers.Hlc, future)
    const pa = await rt.js.publish('fleet.events.p-3.reading', JSON.stringify(skewed), {
      msgID: skewed.eventId,
      headers: h,
    })
    await waitFor('the skewed reading to be handled', () => processor!.stats.checkpoint === pa.seq)

    expect(await rt.db.selectFrom('latest_readings').select(['value', 'hlc']).execute()).toEqual([
      { value: 20, hlc: good.event.hlc },
    ])
    const cp = await rt.db
      .selectFrom('processor_checkpoints')
      .select('hlc')
      .executeTakeFirstOrThrow()
    expect(cp.hlc).toBe(good.event.hlc)
    const m = await rt.jsm.streams.getMessage(rt.config.streams.dlq, { seq: 1 })
    expect(m?.header.get(Headers.DlqReason)).toBe('clock-skew')
    expect(m?.header.get(Headers.DlqDetail)).toMatch(
      /ms ahead of the reference clock, more than the max offset of 500 ms/,
    )
  })
})
