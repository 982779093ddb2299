/**
 * The sensor-status processor's spec: what it reads, handles and writes.
 */
import type { Config } from '../infra/config.ts'
import { anyEvents } from '../projections/projection.ts'
import { sensorStatusBulkLoad } from '../projections/sensor-status-bulk-load.ts'
import { sensorStatusProjection } from '../projections/sensor-status.ts'
import type { ProcessorSpec } from './runner/types.ts'

/**
 * sensor-status
 * - reads:   FLEET_EVENTS, durable consumer `sensor-status`, filter `fleet.events.>`
 * - handles: sensor.registered, reading.recorded, heartbeat.received, status.changed, clock.ticked
 * - writes:  sensor_status, sensor_status_history, projection_clocks (+ its checkpoint)
 */
export function sensorStatusProcessor(config: Config): ProcessorSpec {
  const opts = { defaultTimeoutSeconds: config.sensorInactivityTimeoutSeconds }
  const projection = anyEvents(sensorStatusProjection(opts))
  return {
    name: 'sensor-status',
    reads: 'all',
    projection,
    bulkLoad: () => sensorStatusBulkLoad(projection, opts),
  }
}
