import type { Kysely } from 'kysely'
import type { AnyProjection } from './projection.ts'
import type { Database } from './tables.ts'

/**
 * Empties a projection's tables and forgets its checkpoint and stream time, in one transaction,
 * so that its processor rebuilds it from sequence 1 on its next start. Tables shared between
 * projections (`projection_clocks`) lose only this projection's row.
 */
export async function resetProjection(
  db: Kysely<Database>,
  processor: string,
  projection: AnyProjection,
): Promise<void> {
  await db.transaction().execute(async (trx) => {
    for (const table of projection.tables) {
      if (table === 'projection_clocks') {
        await trx
          .deleteFrom('projection_clocks')
          .where('projection', '=', projection.name)
          .execute()
      } else {
        await trx.deleteFrom(table).execute()
      }
    }
    await trx.deleteFrom('processor_checkpoints').where('processor', '=', processor).execute()
  })
}
