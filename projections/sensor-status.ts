import { sql, type Transaction } from 'kysely'
import type { Projection } from './projection.ts'
import { SensorTracker, splitAtTicks, type Transition } from './sensor-tracker.ts'
import type { Database } from './tables.ts'
import { textArray } from './text-array.ts'

export interface SensorStatusOptions {
  /** Silence after which a sensor without its own timeout becomes `unknown`. */
  readonly defaultTimeoutSeconds: number
}

/**
 * sensor-status: one row per sensor in `sensor_status`, every transition in
 * `sensor_status_history`.
 *
 * Registrations, heartbeats, readings and status changes all count as seen. Explicit status is
 * last-writer-wins by HLC; decommissioned holds until a newer registration; a sensor not seen
 * within its inactivity timeout becomes `unknown` when a clock tick says that much stream time
 * has passed (never by the processor's wall clock, so a replay writes the same history).
 */
export function sensorStatusProjection(
  opts: SensorStatusOptions,
): Projection<
  | 'sensor.registered'
  | 'reading.recorded'
  | 'heartbeat.received'
  | 'status.changed'
  | 'clock.ticked'
> {
  const tracker = new SensorTracker('sensor_status', 'sensor-status', opts.defaultTimeoutSeconds)
  return {
    name: 'sensor-status',
    handles: [
      'sensor.registered',
      'reading.recorded',
      'heartbeat.received',
      'status.changed',
      'clock.ticked',
    ],
    tables: [
      'sensor_status',
      'sensor_status_history',
      'sensor_status_timeline',
      'projection_clocks',
    ],
    async apply(trx, events) {
      for (const segment of splitAtTicks(events)) {
        if (segment.tick) {
          const silenced = await tracker.tick(trx, segment.tick)
          await rewriteHistory(trx, tracker, [...new Set(silenced.map((t) => t.deviceId))])
          continue
        }
        const sensors = await tracker.load(trx, segment.events)
        for (const e of segment.events) sensors.apply(e)
        await rewriteHistory(trx, tracker, await sensors.flush(trx))
      }
    },
  }
}

/**
 * A sensor's history is its timeline folded in HLC order: when a (late) event changes the
 * timeline, the sensor's history is written again, so it is the same whatever the arrival order.
 */
export async function rewriteHistory(
  trx: Transaction<Database>,
  tracker: SensorTracker,
  deviceIds: readonly string[],
): Promise<void> {
  if (deviceIds.length === 0) return
  const history = await tracker.histories(trx, deviceIds)
  await trx
    .deleteFrom('sensor_status_history')
    .where(sql<boolean>`device_id = any(${textArray(deviceIds)}::text[])`)
    .execute()
  await writeHistory(trx, history)
}

async function writeHistory(trx: Transaction<Database>, ts: readonly Transition[]): Promise<void> {
  if (ts.length === 0) return
  const col = <T>(f: (t: Transition) => T) => ts.map(f)
  await sql`
    insert into sensor_status_history (device_id, event_id, stream_seq, from_status, to_status, hlc,
      changed_at, correlation_id, causation_id, reason)
    select * from unnest(${col((t) => t.deviceId)}::text[], ${col((t) => t.eventId)}::text[],
      ${col((t) => t.streamSeq)}::int8[], ${col((t) => t.from)}::text[], ${col((t) => t.to)}::text[],
      ${col((t) => t.hlc)}::text[], ${col((t) => t.at.toISOString())}::timestamptz[],
      ${col((t) => t.correlationId)}::text[], ${col((t) => t.causationId)}::text[], ${col((t) => t.reason)}::text[])
    on conflict (device_id, event_id) do nothing`.execute(trx)
}
