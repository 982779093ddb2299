import type { AnyProjection } from './projection.ts'
import { SensorBulkLoad, slices, type SensorWindow } from './sensor-bulk-load.ts'
import { rewriteHistory, type SensorStatusOptions } from './sensor-status.ts'
import { SensorTracker } from './sensor-tracker.ts'

/**
 * A rebuild's bulk load of the sensor-status tables (projections/sensor-bulk-load.ts): each
 * sensor's lifecycle and timeline are folded in memory by the tracker the projection uses
 * (`TrackerSegment.apply`) across chunks, and its row, timeline and history written once, by the
 * same `flush` and history rewrite as the projection's `apply`.
 *
 * ```ts
 * const load = sensorStatusBulkLoad(spec.projection, { defaultTimeoutSeconds: 300 })
 * ```
 */
export function sensorStatusBulkLoad(
  projection: AnyProjection,
  opts: SensorStatusOptions,
  maxSensors?: number,
): SensorBulkLoad {
  return new SensorBulkLoad(
    projection,
    async (trx): Promise<SensorWindow> => {
      const tracker = new SensorTracker(
        'sensor_status',
        'sensor-status',
        opts.defaultTimeoutSeconds,
      )
      // No sensor is stored yet and no tick applied: every sensor starts new, at no stream time.
      const segment = await tracker.load(trx, [])
      const deviceIds = new Set<string>()
      return {
        deviceIds,
        add(_trx, events) {
          for (const p of events) {
            segment.apply(p)
            deviceIds.add(p.event.deviceId)
          }
          return Promise.resolve()
        },
        async flush(trx) {
          const moved = await segment.flush(trx)
          for (const group of slices(moved, HISTORY_SENSORS))
            await rewriteHistory(trx, tracker, group)
        },
      }
    },
    maxSensors,
  )
}

/** Sensors whose history is folded and written per statement at the flush. */
const HISTORY_SENSORS = 5000
