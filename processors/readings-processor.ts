/**
 * The readings processor's spec: what it reads, handles and writes.
 */
import { anyEvents } from '../projections/projection.ts'
import { readingsBulkLoad, readingsProjection } from '../projections/readings.ts'
import type { ProcessorSpec } from './runner/types.ts'

/**
 * readings
 * - reads:   FLEET_EVENTS, durable consumer `readings`, filter `fleet.events.>` (skips all but
 *            readings: see processors/partitions.ts)
 * - handles: reading.recorded
 * - writes:  readings, latest_readings, readings_per_minute (+ its checkpoint)
 */
export const readingsProcessor: ProcessorSpec = {
  name: 'readings',
  reads: 'reading',
  projection: anyEvents(readingsProjection),
  bulkLoad: () => readingsBulkLoad,
}
