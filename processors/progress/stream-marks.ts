/**
 * Stream marks: per commit, a digest of the stream range it applied, and the reads that find where
 * FLEET_EVENTS stopped agreeing with them (used by processors/runner/stream-watch.ts).
 */
import { createHash } from 'node:crypto'
import type { JetStreamManager, JsMsg } from '@nats-io/jetstream'
import { sql, type Kysely, type Transaction } from 'kysely'
import { rewindTo, type CheckpointPosition, type StreamMark } from './checkpoints.ts'
import { ownRows } from '../partitions.ts'
import type { Database } from '../../projections/tables.ts'
import { subjectMatches } from '../../schemas/subjects.ts'

/**
 * Stream marks: how a processor notices that FLEET_EVENTS no longer holds what it applied.
 *
 * A checkpoint is a stream sequence, and it is only right while the stream keeps the same message
 * at every sequence. nats-server 2.9 does not always: after a stream leader dies, its successor
 * can lack the last messages the old leader handed out, and new events take their sequences.
 * A processor whose checkpoint had passed them would never read those new events. So each commit
 * records its range, how many of the processor's messages were in it and a digest of them all,
 * with the checkpoint (see `advanceCheckpoint`). After anything that can change the stream under
 * us (a session start, a new stream leader, a reconnect, the stream ending below what was
 * delivered) the recent marks are compared with the stream message by message, and on the first
 * disagreement the checkpoint goes back to where that commit started. Projections apply events
 * idempotently, so what is read again changes nothing it already has.
 *
 * Every message, not only a commit's ends: a batch can hold messages delivered before a failover
 * and after it (a processor with a backlog has a full buffer), so its first and last message can
 * agree with the stream while the middle does not.
 */

/**
 * At a session start, the marks committed within this long before the newest one from before the
 * session are compared: what a failover can have rewritten is the tail applied just before it (the
 * stream does not say whether one happened while the processor was away).
 */
export const SESSION_START_WINDOW_MS = 10_000
/** A commit's last message is compared with the stream once the commit is this old. */
export const SWEEP_DELAY_MS = 20_000
/** A session sweeps the marks committed within this long before the newest one, and all after. */
const SESSION_SWEEP_MS = 60_000
/** At most this many marks are compared at once (the newest). */
const MAX_MARKS = 20_000
/** Marks are kept this long by a running processor, then pruned. */
const RETENTION_MS = 15 * 60_000
/** Stream lookups in flight at once. */
const LOOKUPS = 64

/** Folds messages, in stream order, into a mark's digest (subject and payload: MQTT messages carry no id). */
export class MarkDigest {
  readonly #hash = createHash('sha256')
  messages = 0

  add(subject: string, data: Uint8Array): void {
    this.#hash.update(`${subject}\0${data.length}\0`).update(data)
    this.messages++
  }

  digest(): string {
    return this.#hash.digest('base64url').slice(0, 22)
  }
}

function digestOfOne(subject: string, data: Uint8Array): string {
  const d = new MarkDigest()
  d.add(subject, data)
  return d.digest()
}

/**
 * The mark of a commit moving the checkpoint from `fromSeq` to `toSeq`, out of the messages in
 * hand (in stream order); undefined when none of them lies in that range.
 */
export function markOf(
  messages: readonly JsMsg[],
  fromSeq: number,
  toSeq: number,
): StreamMark | undefined {
  const d = new MarkDigest()
  let last: JsMsg | undefined
  for (const m of messages) {
    const seq = m.info.streamSequence
    if (seq > fromSeq && seq <= toSeq) {
      d.add(m.subject, m.data)
      last = m
    }
  }
  if (last === undefined) return undefined
  return {
    fromSeq,
    lastSeq: last.info.streamSequence,
    messages: d.messages,
    digest: d.digest(),
    lastDigest: digestOfOne(last.subject, last.data),
  }
}

/** Where the stream stopped agreeing with what a processor applied. */
export interface Divergence {
  /** The mark that disagrees first; the checkpoint goes back to its `fromSeq`. */
  readonly mark: StreamMark
  /** What the stream holds in the mark's range now, for the log. */
  readonly found: string
}

/**
 * Which marks to compare: those of the commits just before a session that started at checkpoint
 * `sessionStart` (the session's own commits, made while the comparison runs, are not among them),
 * or those ending after a sequence.
 */
export type MarksToCompare = { readonly sessionStart: number } | { readonly afterSeq: number }

/**
 * Compares marks of `processor` with what the stream holds in their ranges now, every message
 * the processor's filter subject matches, oldest mark first; returns the first that disagrees.
 * A range that starts before the stream's first sequence (aged out by its limits) cannot be
 * judged and is passed over; one that ends beyond the stream's last, or lost a message inside,
 * disagrees.
 */
export async function findDivergence(
  db: Kysely<Database>,
  jsm: JetStreamManager,
  stream: string,
  processor: string,
  filterSubject: string,
  which: MarksToCompare,
): Promise<Divergence | undefined> {
  const rows = await db
    .selectFrom('processor_stream_marks')
    .select(['from_seq', 'last_seq', 'messages', 'digest', 'last_digest'])
    .where('processor', '=', processor)
    .where((eb) =>
      'sessionStart' in which
        ? eb.and([
            eb('from_seq', '<', which.sessionStart),
            eb(
              'committed_at',
              '>=',
              beforeNewest(processor, SESSION_START_WINDOW_MS, which.sessionStart),
            ),
          ])
        : eb('last_seq', '>', which.afterSeq),
    )
    .orderBy('last_seq', 'desc')
    .limit(MAX_MARKS)
    .execute()
  if (rows.length === 0) return undefined
  const { state } = await jsm.streams.info(stream)
  for (const r of rows.reverse()) {
    const mark: StreamMark = {
      fromSeq: r.from_seq,
      lastSeq: r.last_seq,
      messages: r.messages,
      digest: r.digest,
      lastDigest: r.last_digest,
    }
    if (mark.fromSeq + 1 < state.first_seq) continue
    if (mark.lastSeq > state.last_seq) {
      return { mark, found: `nothing past ${state.last_seq}: the stream ends there` }
    }
    const d = new MarkDigest()
    let gone = 0
    for (let seq = mark.fromSeq + 1; seq <= mark.lastSeq; seq += LOOKUPS) {
      const last = Math.min(mark.lastSeq, seq + LOOKUPS - 1)
      const got = await Promise.all(
        Array.from({ length: last - seq + 1 }, (_, i) =>
          jsm.streams.getMessage(stream, { seq: seq + i }),
        ),
      )
      for (const m of got) {
        if (m === null) gone++
        else if (subjectMatches(filterSubject, m.subject)) d.add(m.subject, m.data)
      }
    }
    if (d.messages !== mark.messages || d.digest() !== mark.digest) {
      return {
        mark,
        found: `${d.messages} of its messages where ${mark.messages} were applied, ${d.messages === mark.messages ? 'other ones' : 'not the same'}${gone > 0 ? `, ${gone} sequences gone` : ''}`,
      }
    }
  }
  return undefined
}

/**
 * The delayed sweep: a stream rewritten under a processor can show up well after a failover (a
 * replica that served the processor and is corrected later), so every commit's last message is
 * compared with the stream once the commit is {@link SWEEP_DELAY_MS} old. Returns the newest
 * sequence swept up to the first mark whose last message disagrees, and that mark's (then a full
 * {@link findDivergence} of what came after the swept part finds where).
 */
export async function sweepMarks(
  db: Kysely<Database>,
  jsm: JetStreamManager,
  stream: string,
  processor: string,
  afterSeq: number,
): Promise<{ sweptTo: number; disagreesAt?: number }> {
  const rows = await db
    .selectFrom('processor_stream_marks')
    .select(['last_seq', 'last_digest'])
    .where('processor', '=', processor)
    .where('last_seq', '>', afterSeq)
    .where('committed_at', '<', sql<Date>`now() - make_interval(secs => ${SWEEP_DELAY_MS / 1000})`)
    .orderBy('last_seq')
    .limit(MAX_MARKS)
    .execute()
  let sweptTo = afterSeq
  for (let i = 0; i < rows.length; i += LOOKUPS) {
    const chunk = rows.slice(i, i + LOOKUPS)
    const got = await Promise.all(
      chunk.map((r) => jsm.streams.getMessage(stream, { seq: r.last_seq })),
    )
    for (const [j, r] of chunk.entries()) {
      const m = got[j]
      if (m === null || m === undefined || digestOfOne(m.subject, m.data) !== r.last_digest) {
        return { sweptTo, disagreesAt: r.last_seq }
      }
      sweptTo = r.last_seq
    }
  }
  return { sweptTo }
}

/**
 * Where a session's sweep starts: after the marks committed more than {@link SESSION_SWEEP_MS}
 * before the newest one (what came after may not have been swept before the processor stopped).
 */
export async function sweepStart(db: Kysely<Database>, processor: string): Promise<number> {
  const row = await db
    .selectFrom('processor_stream_marks')
    .select((eb) => eb.fn.max('last_seq').as('seq'))
    .where('processor', '=', processor)
    .where('committed_at', '<', beforeNewest(processor, SESSION_SWEEP_MS))
    .executeTakeFirst()
  return row?.seq ?? 0
}

/**
 * `ms` before the newest mark of `processor` was committed (by the database's clock); with
 * `startingBelow`, the newest of the marks whose range starts below that sequence.
 */
function beforeNewest(processor: string, ms: number, startingBelow?: number) {
  const below = startingBelow === undefined ? sql`` : sql` and from_seq < ${startingBelow}`
  return sql<Date>`(select max(committed_at) from processor_stream_marks where processor = ${processor}${below}) - make_interval(secs => ${ms / 1000})`
}

/**
 * Moves `processor`'s checkpoint back from `from` to `toSeq` and forgets the marks past it, in one
 * transaction. Fenced like a commit: throws {@link CheckpointConflictError} if the checkpoint is
 * no longer at `from`.
 */
export async function rewindCheckpoint(
  db: Kysely<Database>,
  processor: string,
  from: CheckpointPosition,
  toSeq: number,
): Promise<CheckpointPosition> {
  return db.transaction().execute(async (trx) => {
    if (toSeq === from.lastSeq) {
      // Nothing to move (marks from before a replay or reset): only forget the marks past it.
      await forgetPast(trx, processor, toSeq)
      return from
    }
    await rewindTo(trx, processor, from, toSeq)
    await forgetPast(trx, processor, toSeq)
    return { lastSeq: toSeq, hlc: from.hlc }
  })
}

async function forgetPast(
  trx: Transaction<Database>,
  processor: string,
  seq: number,
): Promise<void> {
  await trx
    .deleteFrom('processor_stream_marks')
    .where('processor', '=', processor)
    .where('last_seq', '>', seq)
    .execute()
}

/** Drops marks past their retention. */
export async function pruneMarks(db: Kysely<Database>, processor: string): Promise<void> {
  await db
    .deleteFrom('processor_stream_marks')
    .where('processor', '=', processor)
    .where('committed_at', '<', sql<Date>`now() - make_interval(secs => ${RETENTION_MS / 1000})`)
    .execute()
}

/** Forgets every mark of the processor and of each of its partitions (a reset), inside `trx`. */
export async function forgetMarks(trx: Transaction<Database>, processor: string): Promise<void> {
  await sql`delete from processor_stream_marks where ${ownRows('processor', processor)}`.execute(
    trx,
  )
}
