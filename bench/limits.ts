import {
  AckPolicy,
  DeliverPolicy,
  jetstream,
  type JetStreamManager,
  type JsMsg,
} from '@nats-io/jetstream'
import type { NatsConnection } from '@nats-io/transport-node'
import type pg from 'pg'
import type { ReadingRecorded } from '../schemas/events.ts'
import { type BenchEvent, BenchError, waitUntil } from './common.ts'

/** A scratch stream with FLEET_EVENTS' settings, on its own subjects, for the raw limits. */
export const RAW_STREAM = 'BENCH_RAW'
export const RAW_PREFIX = 'bench.raw.'

export async function createRawStream(jsm: JetStreamManager, like: string): Promise<void> {
  const { config } = await jsm.streams.info(like)
  await jsm.streams.add({ ...config, name: RAW_STREAM, subjects: [`${RAW_PREFIX}>`] })
}

/** (a) core NATS publish, no acks: until the stream has stored all of them. */
export async function corePublish(
  nc: NatsConnection,
  jsm: JetStreamManager,
  events: readonly BenchEvent[],
): Promise<{ seconds: number; stored: number }> {
  const start = performance.now()
  for (let i = 0; i < events.length; i++) {
    const e = events[i]
    if (e === undefined) continue
    nc.publish(RAW_PREFIX + e.subject, e.body)
    // Bounded client buffer: without it a million events sit in memory before the first write.
    if (i % 5000 === 4999) await nc.flush()
  }
  await nc.flush()
  let stored = 0
  await waitUntil(
    `${RAW_STREAM} to store ${events.length} core publishes (has ${stored})`,
    async () => {
      stored = (await jsm.streams.info(RAW_STREAM)).state.messages
      return stored >= events.length
    },
    60_000,
    5,
  ).catch((err: unknown) => {
    // Core publish is fire and forget: report what was stored rather than fail the run.
    if (!(err instanceof BenchError)) throw err
  })
  return { seconds: (performance.now() - start) / 1000, stored }
}

/** (b) a raw JetStream consume, AckPolicy.All, acking one message in `ackEvery`. */
export async function rawConsume(
  nc: NatsConnection,
  jsm: JetStreamManager,
  count: number,
): Promise<{ seconds: number }> {
  const ackEvery = 1000
  await jsm.consumers.add(RAW_STREAM, {
    durable_name: 'bench-raw',
    ack_policy: AckPolicy.All,
    deliver_policy: DeliverPolicy.All,
    max_ack_pending: 50_000,
  })
  const consumer = await jetstream(nc).consumers.get(RAW_STREAM, 'bench-raw')
  const start = performance.now()
  const messages = await consumer.consume({ max_messages: 5000 })
  let n = 0
  for await (const m of messages) {
    n++
    if (n % ackEvery === 0 || n === count) m.ack()
    if (n >= count) break
  }
  const seconds = (performance.now() - start) / 1000
  await messages.close()
  return { seconds }
}

/** Columns of a `readings` row, as the readings projection writes them. */
function columns(events: readonly ReadingRecorded[], firstSeq: number) {
  const now = new Date().toISOString()
  return [
    events.map((e) => e.eventId),
    events.map((e) => e.deviceId),
    events.map((e) => e.data.metric),
    events.map((e) => e.data.value),
    events.map((e) => e.data.unit),
    events.map((e) => e.occurredAt),
    events.map((e) => e.hlc),
    events.map((e) => e.correlationId),
    events.map((e) => e.causationId ?? null),
    events.map((_, i) => firstSeq + i),
    events.map(() => now),
  ]
}

const INSERT_COLUMNS =
  '(event_id, device_id, metric, value, unit, occurred_at, hlc, correlation_id, causation_id, stream_seq, ingested_at)'

/** Scratch tables shaped like `readings` (same columns, keys and indexes). */
export async function createScratchTables(pool: pg.Pool): Promise<void> {
  await pool.query('create table bench_raw (like readings including all)')
  await pool.query('create table bench_naive (like readings including all)')
}

/** (c) a raw set-based write: one unnest INSERT per 1000-row batch, one connection. */
export async function rawWrite(
  pool: pg.Pool,
  events: readonly BenchEvent[],
): Promise<{ seconds: number }> {
  const client = await pool.connect()
  try {
    const start = performance.now()
    for (let i = 0; i < events.length; i += 1000) {
      const batch = events.slice(i, i + 1000).map((e) => e.event)
      await client.query(
        `insert into bench_raw ${INSERT_COLUMNS}
         select * from unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::text[],
                              $6::timestamptz[], $7::text[], $8::text[], $9::text[], $10::int8[],
                              $11::timestamptz[])
         on conflict (event_id) do nothing`,
        columns(batch, i + 1),
      )
    }
    return { seconds: (performance.now() - start) / 1000 }
  } finally {
    client.release()
  }
}

/**
 * What a user would write instead: consume, one INSERT per message, ack each message
 * (AckPolicy.Explicit), one message at a time.
 */
export async function naive(
  nc: NatsConnection,
  jsm: JetStreamManager,
  pool: pg.Pool,
  count: number,
): Promise<{ seconds: number }> {
  await jsm.consumers.add(RAW_STREAM, {
    durable_name: 'bench-naive',
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    max_ack_pending: 1000,
  })
  const consumer = await jetstream(nc).consumers.get(RAW_STREAM, 'bench-naive')
  const client = await pool.connect()
  try {
    const start = performance.now()
    const messages = await consumer.consume()
    let n = 0
    for await (const m of messages) {
      await insertOne(client, m)
      m.ack()
      if (++n >= count) break
    }
    const seconds = (performance.now() - start) / 1000
    await messages.close()
    return { seconds }
  } finally {
    client.release()
  }
}

async function insertOne(client: pg.PoolClient, m: JsMsg): Promise<void> {
  const e = m.json<ReadingRecorded>()
  await client.query(
    `insert into bench_naive ${INSERT_COLUMNS}
     values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) on conflict (event_id) do nothing`,
    [
      e.eventId,
      e.deviceId,
      e.data.metric,
      e.data.value,
      e.data.unit,
      e.occurredAt,
      e.hlc,
      e.correlationId,
      e.causationId ?? null,
      m.info.streamSequence,
      new Date(Math.floor(m.info.timestampNanos / 1e6)).toISOString(),
    ],
  )
}
