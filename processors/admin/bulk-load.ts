/**
 * How a rebuild fills a projection's empty scratch tables before it follows the live processor:
 * the projection's own `apply` in large chunks, or a projection's faster bulk load where it has one.
 */
import type { Transaction } from 'kysely'
import { defaultAlertRulesPath, loadAlertRules } from '../../infra/alert-rules-file.ts'
import type { Config } from '../../infra/config.ts'
import { alertsBulkLoad } from '../../projections/alerts-bulk-load.ts'
import type { CopyIn } from '../../projections/copy-rows.ts'
import type { AnyProjection, ProjectedEvent } from '../../projections/projection.ts'
import { readingsBulkLoad } from '../../projections/readings.ts'
import { sensorStatusBulkLoad } from '../../projections/sensor-status-bulk-load.ts'
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
  /**
   * It keeps what chunks gave it in memory until `finish` (or writes it in a later chunk): a chunk
   * whose transaction failed cannot be given again, and the rebuild starts over instead.
   */
  readonly holdsState?: boolean
}

/**
 * The bulk load of a projection: its own, or its `apply` with nothing to finish. Those of
 * sensor-status and alerts fold with the options the processors are built with
 * (processors/processor-registry.ts: the alert rules file and the inactivity timeout of `config`).
 */
export async function bulkLoadOf(projection: AnyProjection, config: Config): Promise<BulkLoad> {
  const defaultTimeoutSeconds = config.sensorInactivityTimeoutSeconds
  switch (projection.name) {
    case 'readings':
      return readingsBulkLoad
    case 'sensor-status':
      return sensorStatusBulkLoad(projection, { defaultTimeoutSeconds })
    case 'alerts': {
      const rules = await loadAlertRules(config.alertRulesFile ?? defaultAlertRulesPath())
      return alertsBulkLoad(projection, { rules, defaultTimeoutSeconds })
    }
    default:
      return {
        apply: (trx, events) => projection.apply(trx, events),
        finish: () => Promise.resolve(),
      }
  }
}
