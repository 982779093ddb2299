import { sql, type Kysely, type Transaction } from 'kysely'
import type { Database } from './tables.ts'

export interface CheckpointPosition {
  /** Last FLEET_EVENTS sequence applied; 0 before the first. */
  readonly lastSeq: number
  /** Newest event HLC applied: the processor's restored high-water mark. */
  readonly hlc: string | null
}

/** Another instance moved the checkpoint under us; the transaction must roll back. */
export class CheckpointConflictError extends Error {
  override readonly name = 'CheckpointConflictError'
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

/**
 * Moves the checkpoint from `from` to `to` inside the read-model transaction. Fenced: if the
 * stored position is not `from.lastSeq`, someone else advanced it and this throws, so the whole
 * batch rolls back instead of being applied twice or skipping a gap.
 */
export async function advanceCheckpoint(
  trx: Transaction<Database>,
  processor: string,
  stream: string,
  from: CheckpointPosition,
  to: CheckpointPosition,
): Promise<void> {
  const result = await sql`
    insert into processor_checkpoints as c (processor, stream, last_seq, hlc, updated_at)
    values (${processor}, ${stream}, ${to.lastSeq}, ${to.hlc}, now())
    on conflict (processor) do update
      set last_seq = excluded.last_seq, hlc = excluded.hlc, updated_at = excluded.updated_at
      where c.last_seq = ${from.lastSeq}`.execute(trx)
  if (result.numAffectedRows !== 1n) {
    throw new CheckpointConflictError(
      `checkpoint of '${processor}' is no longer at ${from.lastSeq}: another instance is processing`,
    )
  }
}

/** Forget a processor's position (for a rebuild from sequence 1). */
export async function resetCheckpoint(db: Kysely<Database>, processor: string): Promise<void> {
  await db.deleteFrom('processor_checkpoints').where('processor', '=', processor).execute()
}
