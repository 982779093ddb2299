/**
 * Resets a projection: its tables emptied, its checkpoint and marks forgotten.
 */
import { sql, type Kysely } from 'kysely'
import { ownRows } from '../partitions.ts'
import { forgetCheckpoints } from '../progress/checkpoints.ts'
import { forgetMarks } from '../progress/stream-marks.ts'
import { SHARED_TABLES } from './blue-green.ts'
import type { AnyProjection } from '../../projections/projection.ts'
import type { Database } from '../../projections/tables.ts'

/**
 * Empties a projection's tables and forgets its checkpoint and stream time, in one transaction,
 * so that its processor rebuilds it from sequence 1 on its next start. Tables shared between
 * projections (`projection_clocks`) lose only this projection's rows.
 */
export async function resetProjection(
  db: Kysely<Database>,
  processor: string,
  projection: AnyProjection,
): Promise<void> {
  await db.transaction().execute(async (trx) => {
    for (const table of projection.tables) {
      const key = SHARED_TABLES[table]
      if (key !== undefined) {
        await sql`delete from ${sql.table(table)} where ${ownRows(key, projection.name)}`.execute(
          trx,
        )
      } else {
        await trx.deleteFrom(table).execute()
      }
    }
    // The processor's checkpoint, or each of its partitions', and what it read up to there.
    await forgetCheckpoints(trx, processor)
    await forgetMarks(trx, processor)
  })
}
