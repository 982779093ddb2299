import type { Transaction } from 'kysely'
import type { ThresholdRule } from './alert-rules.ts'
import { inputsOf, keptReadings, refold, type AlertsOptions, type KeptFold } from './alerts.ts'
import { copyRows, type CopyIn } from './copy-rows.ts'
import { jsonRows } from './json-rows.ts'
import type { AnyProjection } from './projection.ts'
import { RowCache } from './row-cache.ts'
import { SensorBulkLoad, slices, type SensorWindow } from './sensor-bulk-load.ts'
import { SensorTracker } from './sensor-tracker.ts'
import type { AlertInputTable, Database } from './tables.ts'

/**
 * A rebuild's bulk load of the alerts tables (projections/sensor-bulk-load.ts): per chunk, the
 * inputs the events feed the rules (`alert_inputs`, the history the folds read) go in by COPY,
 * and each sensor's lifecycle and timeline are folded in memory by the tracker the projection
 * uses; at the flush the sensors are written and every rule of every sensor folded once over
 * all its inputs, by the projection's own `refold` (its alerts, conditions, notifications, tips
 * and horizons, the inputs pruned to its window): what `apply` does with one batch of new sensors.
 *
 * ```ts
 * const load = alertsBulkLoad(spec.projection, { rules, defaultTimeoutSeconds: 300 })
 * ```
 */
export function alertsBulkLoad(
  projection: AnyProjection,
  opts: AlertsOptions,
  maxSensors?: number,
): SensorBulkLoad {
  const rules = opts.rules.rules
  const thresholds = rules.filter((r): r is ThresholdRule => r.kind === 'threshold')
  const window = keptReadings(opts)
  return new SensorBulkLoad(
    projection,
    async (trx): Promise<SensorWindow> => {
      const tracker = new SensorTracker('alert_sensors', 'alerts', opts.defaultTimeoutSeconds)
      // No sensor is stored yet and no tick applied: every sensor starts new, at no stream time.
      const segment = await tracker.load(trx, [])
      const deviceIds = new Set<string>()
      /** Sensors fed an input: folded at the flush even when the tracker did not move them. */
      const fed = new Set<string>()
      return {
        deviceIds,
        async add(trx, events, copy) {
          const rows: AlertInputTable[] = []
          // The first copy of an input stays, as the live insert's `on conflict do nothing`.
          // Inputs are keyed only once an event id repeats in the chunk (rare).
          const ids = new Set<string>()
          let keys: Set<string> | undefined
          for (const p of events) {
            segment.apply(p)
            deviceIds.add(p.event.deviceId)
            if (keys === undefined && ids.has(p.event.eventId)) keys = new Set(rows.map(inputKey))
            ids.add(p.event.eventId)
            for (const i of inputsOf(thresholds, p.event)) {
              if (keys !== undefined) {
                const k = inputKey(i)
                if (keys.has(k)) continue
                keys.add(k)
              }
              rows.push(i)
              fed.add(i.device_id)
            }
          }
          await addInputs(trx, rows, copy)
        },
        async flush(trx) {
          const moved = await segment.flush(trx)
          const devices = [...new Set([...moved, ...fed])].sort()
          // Never read back by this process: nothing to keep between folds.
          const folds = new RowCache<KeptFold>(1)
          for (const group of slices(devices, FOLD_SENSORS))
            await refold(trx, tracker, folds, rules, window, group, [])
        },
      }
    },
    maxSensors,
  )
}

/** Sensors folded per `refold` at the flush (it reads all their inputs at once). */
const FOLD_SENSORS = 1000

/** Columns of `alert_inputs`, in the order the COPY sends them. */
const INPUT_COLUMNS = [
  'device_id',
  'rule_id',
  'event_id',
  'kind',
  'hlc',
  'correlation_id',
  'value',
  'alert_id',
  'acknowledged_by',
] as const satisfies readonly (keyof AlertInputTable)[]

/**
 * Adds inputs by COPY. An input an earlier chunk stored (an event re-published outside the
 * dedup window) fails the COPY; then they go by an insert that keeps the stored one.
 */
async function addInputs(
  trx: Transaction<Database>,
  rows: readonly AlertInputTable[],
  copy: CopyIn,
): Promise<void> {
  await copyRows(trx, copy, 'alert_inputs', INPUT_COLUMNS, rows, () => {
    const src = jsonRows('alert_inputs', rows)
    return trx
      .insertInto('alert_inputs')
      .columns(src.columns)
      .expression(src.select)
      .onConflict((oc) => oc.columns(['device_id', 'rule_id', 'event_id']).doNothing())
      .execute()
  })
}

function inputKey(i: AlertInputTable): string {
  return `${i.device_id}\u0000${i.rule_id}\u0000${i.event_id}`
}
