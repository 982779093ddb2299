/**
 * How a rebuild fills a projection's empty scratch tables before it follows the live processor:
 * the projection's own `apply` in large chunks, or a projection's faster bulk load where it has one.
 */
import type { Transaction } from 'kysely'
import type { CopyIn } from '../../projections/copy-rows.ts'
import type { AnyProjection, ProjectedEvent } from '../../projections/projection.ts'
import { readingsBulkLoad } from '../../projections/readings.ts'
import type { Database } from '../../projections/tables.ts'

/**
 * The bulk phase of a rebuild: `apply` takes the stream in order, chunk by chunk, into tables
 * that started empty (`copy` sends COPY payloads in `trx`); `finish` runs once, after the last
 * chunk, and leaves the tables exactly as the projection's `apply` would have; from then on the
 * projection's own `apply` follows.
 */
export interface BulkLoad {
  apply(trx: Transaction<Database>, events: readonly ProjectedEvent[], copy: CopyIn): Promise<void>
  finish(trx: Transaction<Database>): Promise<void>
}

/** Projections whose tables a rebuild fills another way than event by event, by name. */
const BULK_LOADS: Readonly<Record<string, BulkLoad>> = {
  readings: readingsBulkLoad,
}

/** The bulk load of a projection: its own, or its `apply` with nothing to finish. */
export function bulkLoadOf(projection: AnyProjection): BulkLoad {
  return (
    BULK_LOADS[projection.name] ?? {
      apply: (trx, events) => projection.apply(trx, events),
      finish: () => Promise.resolve(),
    }
  )
}
