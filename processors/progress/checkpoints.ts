/**
 * Every SQL statement on `processor_checkpoints`: where each processor (or partition: a slot,
 * processors/partitions.ts) has got to in FLEET_EVENTS. The live run advances it in the same
 * transaction as the read model; the stream watch, a replay and a reset move it back; a rebuild
 * and the status read it.
 */
import { sql, type Kysely, type Transaction } from 'kysely'
import { ownRows } from '../partitions.ts'
import type { Database } from '../../projections/tables.ts'
import { TransientError } from '../../schemas/errors.ts'

export interface CheckpointPosition {
  /** Last FLEET_EVENTS sequence applied; 0 before the first. */
  readonly lastSeq: number
  /** Newest event HLC applied: the processor's restored high-water mark. */
  readonly hlc: string | null
}

/**
 * Another instance moved the checkpoint under us, or may be about to (the slot's lease ran out:
 * processors/progress/slot-fence.ts); the transaction must roll back and the session end.
 */
export class CheckpointConflictError extends TransientError {
  constructor(
    processor: string,
    expectedSeq: number | undefined,
    message = `checkpoint of '${processor}' is no longer at ${expectedSeq}: another instance is processing`,
  ) {
    super(message)
  }
}

export async function readCheckpoint(
  db: Kysely<Database>,
  processor: string,
): Promise<CheckpointPosition> {
  const row = await db
    .selectFrom('processor_checkpoints')
    .select(['last_seq', 'hlc'])
    .where('processor', '=', processor)
    .executeTakeFirst()
  return { lastSeq: row?.last_seq ?? 0, hlc: row?.hlc ?? null }
}

/** A commit's range of the stream, (fromSeq, lastSeq], and what it read there (processors/progress/stream-marks.ts). */
export interface StreamMark {
  /** The checkpoint the commit started from. */
  readonly fromSeq: number
  readonly lastSeq: number
  /** How many of the processor's messages the range held. */
  readonly messages: number
  /** Of those messages, in stream order. */
  readonly digest: string
  /** Of the message at `lastSeq` alone. */
  readonly lastDigest: string
}

/**
 * Moves the checkpoint from `from` to `to` inside the read-model transaction, and records the
 * commit's mark when given, in one statement. Fenced: if the stored position is not
 * `from.lastSeq`, someone else advanced it and this throws, so the whole batch rolls back
 * instead of being applied twice or skipping a gap.
 */
export async function advanceCheckpoint(
  trx: Transaction<Database>,
  processor: string,
  stream: string,
  from: CheckpointPosition,
  to: CheckpointPosition,
  mark?: StreamMark,
): Promise<void> {
  const moved = sql`
    insert into processor_checkpoints as c (processor, stream, last_seq, hlc, updated_at)
    values (${processor}, ${stream}, ${to.lastSeq}, ${to.hlc}, now())
    on conflict (processor) do update
      set last_seq = excluded.last_seq, hlc = excluded.hlc, updated_at = excluded.updated_at
      where c.last_seq = ${from.lastSeq}
    returning 1`
  // A replay may cover a range again: its mark replaces the old one.
  const result =
    mark === undefined
      ? await sql<{
          moved: number
        }>`with moved as (${moved}) select count(*)::int as moved from moved`.execute(trx)
      : await sql<{ moved: number }>`
          with moved as (${moved}), marked as (
            insert into processor_stream_marks
              (processor, from_seq, last_seq, messages, digest, last_digest)
            select ${processor}, ${mark.fromSeq}, ${mark.lastSeq}, ${mark.messages}, ${mark.digest},
              ${mark.lastDigest}
            where exists (select from moved)
            on conflict (processor, last_seq) do update
              set from_seq = excluded.from_seq, messages = excluded.messages,
                digest = excluded.digest, last_digest = excluded.last_digest,
                committed_at = now())
          select count(*)::int as moved from moved`.execute(trx)
  if (result.rows[0]?.moved !== 1) throw new CheckpointConflictError(processor, from.lastSeq)
}

/**
 * Moves `processor`'s checkpoint back from `from` to `toSeq` inside `trx`. Fenced like a commit:
 * throws {@link CheckpointConflictError} if the checkpoint is no longer at `from`.
 */
export async function rewindTo(
  trx: Transaction<Database>,
  processor: string,
  from: CheckpointPosition,
  toSeq: number,
): Promise<void> {
  const moved = await trx
    .updateTable('processor_checkpoints')
    .set({ last_seq: toSeq, updated_at: sql<Date>`now()` })
    .where('processor', '=', processor)
    .where('last_seq', '=', from.lastSeq)
    .executeTakeFirst()
  if (moved.numUpdatedRows !== 1n) throw new CheckpointConflictError(processor, from.lastSeq)
}

/** The checkpoint of each of `slots` (0 for one that never committed). */
export async function readCheckpointSeqs(
  db: Kysely<Database>,
  slots: readonly string[],
): Promise<Map<string, number>> {
  const rows = await db
    .selectFrom('processor_checkpoints')
    .select(['processor', 'last_seq'])
    .where('processor', 'in', [...slots])
    .execute()
  const at = new Map(slots.map((s) => [s, 0]))
  for (const r of rows) at.set(r.processor, r.last_seq)
  return at
}

/**
 * Locks the checkpoint rows of `slots` in `trx` (a commit of theirs waits) and reads them (0 for
 * one that never committed). In `public`: a rebuild's connection looks in its scratch schema first.
 */
export async function lockCheckpoints(
  trx: Transaction<Database>,
  slots: readonly string[],
): Promise<Map<string, CheckpointPosition>> {
  const rows = await sql<{ processor: string; last_seq: number; hlc: string | null }>`
    select processor, last_seq, hlc from public.processor_checkpoints
    where processor = any(${[...slots]}::text[]) order by processor for update`.execute(trx)
  const at = new Map<string, CheckpointPosition>(slots.map((s) => [s, { lastSeq: 0, hlc: null }]))
  for (const r of rows.rows) at.set(r.processor, { lastSeq: r.last_seq, hlc: r.hlc })
  return at
}

/** Moves every checkpoint of `slots` above `lastSeq` back to it (a replay), inside `trx`. */
export async function lowerCheckpoints(
  trx: Transaction<Database>,
  slots: readonly string[],
  lastSeq: number,
): Promise<void> {
  await trx
    .updateTable('processor_checkpoints')
    .set({ last_seq: lastSeq, updated_at: sql<Date>`now()` })
    .where('processor', 'in', [...slots])
    .where('last_seq', '>', lastSeq)
    .execute()
}

/** Forgets the checkpoint of the processor and of each of its partitions (a reset), inside `trx`. */
export async function forgetCheckpoints(
  trx: Transaction<Database>,
  processor: string,
): Promise<void> {
  await sql`delete from processor_checkpoints where ${ownRows('processor', processor)}`.execute(trx)
}

/** A checkpoint row as the status shows it. */
export interface CheckpointRow {
  readonly processor: string
  readonly lastSeq: number
  readonly hlc: string | null
  readonly updatedAt: Date
  /** Seconds since it last moved, by the database's clock. */
  readonly ageSeconds: number
}

/** The checkpoint rows of `slots` that exist. */
export async function readCheckpointRows(
  db: Kysely<Database>,
  slots: readonly string[],
): Promise<CheckpointRow[]> {
  const rows = await db
    .selectFrom('processor_checkpoints')
    .select([
      'processor',
      'last_seq',
      'hlc',
      'updated_at',
      sql<number>`extract(epoch from now() - updated_at)::float8`.as('age'),
    ])
    .where('processor', 'in', [...slots])
    .execute()
  return rows.map((r) => ({
    processor: r.processor,
    lastSeq: r.last_seq,
    hlc: r.hlc,
    updatedAt: r.updated_at,
    ageSeconds: r.age,
  }))
}
