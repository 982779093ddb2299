/**
 * How a rebuild fills a projection's empty scratch tables before it follows the live processor:
 * the projection's own `apply` in large chunks, or a projection's faster bulk load where it has one.
 */
import type { BulkLoad } from '../../projections/projection.ts'
import type { ProcessorSpec } from '../runner/types.ts'

/** The bulk load of a processor's projection: its own, or its `apply` with nothing to finish. */
export function bulkLoadOf(spec: ProcessorSpec): BulkLoad {
  return (
    spec.bulkLoad?.() ?? {
      apply: (trx, events) => spec.projection.apply(trx, events),
      finish: () => Promise.resolve(),
    }
  )
}
