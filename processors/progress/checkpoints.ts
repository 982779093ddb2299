import { sql, type Kysely, type Transaction } from 'kysely'
import type { Database } from '../../projections/tables.ts'
import { TransientError } from '../../infra/errors.ts'

export interface CheckpointPosition {
  /** Last FLEET_EVENTS sequence applied; 0 before the first. */
  readonly lastSeq: number
  /** Newest event HLC applied: the processor's restored high-water mark. */
  readonly hlc: string | null
}

/**
 * Another instance moved the checkpoint under us, or may be about to (the slot's lease ran out:
 * processors/slot-fence.ts); the transaction must roll back and the session end.
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

/** A commit's range of the stream, (fromSeq, lastSeq], and what it read there (processors/stream-marks.ts). */
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

/** Forget a processor's position (for a rebuild from sequence 1). */
export async function resetCheckpoint(db: Kysely<Database>, processor: string): Promise<void> {
  await db.deleteFrom('processor_checkpoints').where('processor', '=', processor).execute()
}
