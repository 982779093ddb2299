import { sql } from 'kysely'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Runtime } from '../app/runtime.ts'
import { PublishPipeline, type PublishResult } from '../infra/publisher.ts'
import { slotsOf } from '../processors/partitions.ts'
import { startProcessor } from '../processors/runner/runner.ts'
import { type ProcessorSpec, type RunningProcessor } from '../processors/runner/types.ts'
import { readingsProcessor } from '../processors/readings-processor.ts'
import { partitionMapping, partitionOf } from '../schemas/subjects.ts'
import { freshDatabase, startNatsServer, type NatsServer } from './harness/test-servers.ts'
import { readingDraft, testConfig, testPublisher, testRuntime, waitFor } from './fixtures.ts'

/**
 * The processor's stages overlap (batch k+1 is taken and decided while batch k commits), and the
 * slots of a partitioned processor commit side by side, from two instances here. What must hold
 * whatever the interleaving: each event is applied in exactly one committed transaction, and a
 * checkpoint never covers a sequence whose event is not committed (a low-watermark).
 */
const PARTITIONS = 4
const DEVICES = 120
const EVENTS = 3000

let nats: NatsServer
let rt: Runtime
const running: RunningProcessor[] = []

/**
 * readings, plus one `apply_log` row per event in every transaction that applies it: a row per
 * committed application, so a count tells "applied twice" and "skipped" apart from "applied once".
 */
const loggedReadings: ProcessorSpec = {
  ...readingsProcessor,
  projection: {
    ...readingsProcessor.projection,
    async apply(trx, events) {
      await sql`insert into apply_log (partition, stream_seq, event_id)
                select * from unnest(${events.map((e) => e.partition ?? -1)}::int[],
                                     ${events.map((e) => e.streamSeq)}::int8[],
                                     ${events.map((e) => e.event.eventId)}::text[])`.execute(trx)
      await readingsProcessor.projection.apply(trx, events)
    },
  },
}

beforeAll(async () => {
  const m = partitionMapping(PARTITIONS)
  nats = await startNatsServer({
    extraConfig: `mappings: { ${JSON.stringify(m.from)}: ${JSON.stringify(m.to)} }`,
  })
  rt = await testRuntime(
    testConfig(nats.url, await freshDatabase(), {
      FLEET_PARTITIONS: String(PARTITIONS),
      // Small batches: many of them, each prepared while the one before commits.
      PROCESSOR_BATCH_SIZE: '25',
      PROCESSOR_BATCH_LINGER_MS: '1',
    }),
  )
  await sql`create table apply_log (partition int not null, stream_seq int8 not null,
                                    event_id text not null)`.execute(rt.db)
  // While `commit_fault` holds a row, every checkpoint move fails as a serialization failure
  // would: retried in place, then the session ends with the batches behind it prepared.
  await sql`create table commit_fault (since timestamptz not null)`.execute(rt.db)
  await sql`create function fail_while_faulty() returns trigger language plpgsql as $$
            begin
              if exists (select from commit_fault) then
                raise exception 'injected commit failure' using errcode = '40001';
              end if;
              return new;
            end $$`.execute(rt.db)
  await sql`create trigger fail_while_faulty before insert or update on processor_checkpoints
            for each row execute function fail_while_faulty()`.execute(rt.db)
}, 60_000)

afterAll(async () => {
  await Promise.all(running.map((p) => p.stop()))
  // Either may be unset when beforeAll failed part-way.
  await (rt as Runtime | undefined)?.close()
  await (nats as NatsServer | undefined)?.cleanup()
})

describe('the pipelined processor', () => {
  it('applies every event in exactly one commit and never checkpoints past an uncommitted one, with slots committing side by side and commits failing mid-stream', async () => {
    running.push(startProcessor(loggedReadings, rt), startProcessor(loggedReadings, rt))

    // Events per partition, by stream sequence, as the PubAcks report them.
    const published = Array.from({ length: PARTITIONS }, () => [] as number[])
    const pipe = new PublishPipeline(64, (r: PublishResult) => {
      if (!r.duplicate) published[partitionOf(r.event.deviceId, PARTITIONS)]?.push(r.seq)
    })
    const publisher = testPublisher(rt)

    // The low-watermark, sampled while everything runs: in one snapshot, each slot's checkpoint
    // and how many of its events up to there are committed. Every event at or below a checkpoint
    // must be: the count equals the number published there.
    const violations: string[] = []
    let samples = 0
    const sampling = { on: true }
    const sampler = (async () => {
      while (sampling.on) {
        const { rows } = await sql<{ slot: string; last_seq: string; committed: string }>`
          select c.processor as slot, c.last_seq,
                 (select count(*) from apply_log a
                   where a.partition = substring(c.processor from '-p(\\d+)$')::int
                     and a.stream_seq <= c.last_seq) as committed
            from processor_checkpoints c
           where c.processor like 'readings-p%'`.execute(rt.db)
        for (const r of rows) {
          const p = Number(/-p(\d+)$/.exec(r.slot)?.[1])
          const want = published[p]?.filter((s) => s <= Number(r.last_seq)).length ?? 0
          // A checkpoint past what this test has seen acknowledged yet is checked next round.
          const acked = Math.max(0, ...(published[p] ?? []))
          if (Number(r.last_seq) <= acked && Number(r.committed) !== want) {
            violations.push(`${r.slot} at ${r.last_seq}: ${r.committed} committed of ${want}`)
          }
        }
        samples++
        await new Promise((r) => setTimeout(r, 5))
      }
    })()

    for (let i = 0; i < EVENTS; i++) {
      await pipe.submit(() => publisher.publish(readingDraft(`pipe-${i % DEVICES}`, i)))
      if (i === Math.floor(EVENTS / 3)) {
        // Once some batches are committed, fail every commit for long enough that sessions end
        // (five attempts in place, ~4 s) while the batches behind them are prepared.
        await waitFor('a first commit', async () => {
          const { rows } = await sql<{ n: string }>`select count(*) as n from apply_log`.execute(
            rt.db,
          )
          return Number(rows[0]?.n) > 0
        })
        await sql`insert into commit_fault values (now())`.execute(rt.db)
      }
      if (i === Math.floor((2 * EVENTS) / 3)) {
        await new Promise((r) => setTimeout(r, 6000))
        await sql`delete from commit_fault`.execute(rt.db)
      }
    }
    await pipe.drain()

    const slots = slotsOf(loggedReadings, rt.config)
    await waitFor(
      'every slot to checkpoint the last event of its partition',
      async () => {
        const { rows } = await sql<{ processor: string; last_seq: string }>`
          select processor, last_seq from processor_checkpoints`.execute(rt.db)
        const at = new Map(rows.map((r) => [r.processor, Number(r.last_seq)]))
        return slots.every(
          (s) => (at.get(s.key) ?? 0) >= Math.max(0, ...(published[s.partition ?? 0] ?? [])),
        )
      },
      120_000,
    )
    sampling.on = false
    await sampler

    const { rows } = await sql<{ applied: number; distinct: number; readings: number }>`
      select (select count(*) from apply_log) as applied,
             (select count(distinct event_id) from apply_log) as distinct,
             (select count(*) from readings) as readings`.execute(rt.db)
    expect(rows[0]).toEqual({
      applied: EVENTS,
      distinct: EVENTS,
      readings: EVENTS,
    })
    const { rows: minutes } = await sql<{ n: string }>`
      select coalesce(sum(count), 0) as n from readings_per_minute`.execute(rt.db)
    expect(Number(minutes[0]?.n)).toBe(EVENTS)
    expect(violations).toEqual([])
    expect(samples).toBeGreaterThan(10)
    // The fault was hit, and lasted past the in-place attempts: sessions ended and started again.
    expect(running.reduce((n, p) => n + p.stats.retries, 0)).toBeGreaterThanOrEqual(4)
  }, 240_000)
})
