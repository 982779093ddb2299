import { z } from 'zod'
import { HLC_PATTERN } from './hlc.ts'

/** Device ids are single NATS subject tokens: no dots, wildcards or spaces. */
export const DEVICE_ID_PATTERN = /^[a-z0-9-]{1,64}$/
/** Event, correlation and causation ids: also used as `Nats-Msg-Id`, so header- and subject-safe. */
export const ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$/

export const DeviceId = z.string().regex(DEVICE_ID_PATTERN)
/**
 * The source token of system events (clock ticks) in place of a device id. No device id can take
 * it: `_` is outside the device id alphabet.
 */
export const SYSTEM_SOURCE = '_system'
export const EventId = z.string().regex(ID_PATTERN)
export const HlcString = z.string().regex(HLC_PATTERN)
/** Device clock time; kept as sent, never used for ordering. */
export const Timestamp = z.iso.datetime({ offset: true })

/**
 * Fields every event carries. A concrete event extends it with `type`, `version` and `data`.
 *
 * ```json
 * { "eventId": "0193...", "deviceId": "sensor-7", "type": "reading.recorded", "version": 1,
 *   "occurredAt": "2026-11-23T10:00:00.000Z", "hlc": "1763892000000-000000-sim-1",
 *   "correlationId": "0193...", "data": { "metric": "temperature", "value": 21.5, "unit": "C" } }
 * ```
 */
export const Envelope = z.strictObject({
  eventId: EventId,
  deviceId: DeviceId,
  /** When the device says it happened (its own clock). */
  occurredAt: Timestamp,
  /** When it happened in cluster order: the HLC of the publisher that stamped it. */
  hlc: HlcString,
  /** Shared by every event that one cause set off; the first event's id when it starts a chain. */
  correlationId: EventId,
  /** The event that directly caused this one, if any. */
  causationId: EventId.optional(),
})
export type Envelope = z.infer<typeof Envelope>
