import * as z from 'zod'
import { DEVICE_ID_PATTERN, Envelope, EventId, SYSTEM_SOURCE, Text, Timestamp } from './envelope.ts'

const SiteId = z.string().regex(DEVICE_ID_PATTERN)
/** Printable, no whitespace or control characters. */
const labelPattern = (max: number) => new RegExp(`^[^\\s\\p{C}]{1,${max}}$`, 'u')
const Label = (max: number) => z.string().regex(labelPattern(max))
export const METRIC_PATTERN = /^[a-z][a-z0-9_]{0,63}$/
export const MetricName = z.string().regex(METRIC_PATTERN)
export const UNIT_PATTERN = labelPattern(16)
export const Unit = z.string().regex(UNIT_PATTERN)
export const SensorStatus = z.enum(['active', 'inactive', 'maintenance', 'decommissioned'])
export type SensorStatus = z.infer<typeof SensorStatus>

/** A sensor joined the fleet (or was re-registered). Subject: fleet.events.<deviceId>.registered */
export const SensorRegistered = Envelope.extend({
  type: z.literal('sensor.registered'),
  version: z.literal(1),
  data: z.strictObject({
    site: SiteId,
    model: Label(64),
    firmware: Label(32),
    /** Seconds of silence after which the sensor's status becomes unknown. */
    inactivityTimeoutSeconds: z
      .number()
      .int()
      .min(1)
      .max(7 * 24 * 3600)
      .optional(),
  }),
})
export type SensorRegistered = z.infer<typeof SensorRegistered>

/** One sensor value. Subject: fleet.events.<deviceId>.reading */
export const ReadingRecorded = Envelope.extend({
  type: z.literal('reading.recorded'),
  version: z.literal(1),
  data: z.strictObject({ metric: MetricName, value: z.number(), unit: Unit }),
})
export type ReadingRecorded = z.infer<typeof ReadingRecorded>

/** The device is alive. Subject: fleet.events.<deviceId>.heartbeat */
export const HeartbeatReceived = Envelope.extend({
  type: z.literal('heartbeat.received'),
  version: z.literal(1),
  data: z.strictObject({
    batteryPercent: z.number().min(0).max(100).optional(),
    rssiDbm: z.number().min(-200).max(0).optional(),
    uptimeSeconds: z.number().int().min(0).optional(),
  }),
})
export type HeartbeatReceived = z.infer<typeof HeartbeatReceived>

/** An explicit status change (by the device or an operator). Subject: fleet.events.<deviceId>.status */
export const StatusChanged = Envelope.extend({
  type: z.literal('status.changed'),
  version: z.literal(1),
  data: z.strictObject({ status: SensorStatus, reason: Text(256).optional() }),
})
export type StatusChanged = z.infer<typeof StatusChanged>

/** An operator acknowledged an alert. Subject: fleet.events.<deviceId>.alert */
export const AlertAcknowledged = Envelope.extend({
  type: z.literal('alert.acknowledged'),
  version: z.literal(1),
  data: z.strictObject({
    alertId: EventId,
    /** Who acknowledged it. */
    by: z.string().regex(/^[^\p{C}]{1,64}$/u),
    note: Text(512).optional(),
  }),
})
export type AlertAcknowledged = z.infer<typeof AlertAcknowledged>

/**
 * Time passing, as an event: the clock service publishes one per interval so that time-based
 * logic (silence) reads time from the stream and a replay reproduces it exactly. The eventId is
 * `tick-<at ms>`, so clocks in several processes publish each tick once (JetStream dedup).
 * Subject: fleet.events._system.tick
 */
export const ClockTicked = Envelope.extend({
  deviceId: z.literal(SYSTEM_SOURCE),
  type: z.literal('clock.ticked'),
  version: z.literal(1),
  data: z.strictObject({
    /** The interval boundary this tick marks. */
    at: Timestamp,
    intervalSeconds: z.number().int().min(1).max(3600),
  }),
})
export type ClockTicked = z.infer<typeof ClockTicked>

/** Every event fleetstream accepts; `type` selects the schema, unknown types are rejected. */
export const FleetEvent = z.discriminatedUnion('type', [
  SensorRegistered,
  ReadingRecorded,
  HeartbeatReceived,
  StatusChanged,
  AlertAcknowledged,
  ClockTicked,
])
export type FleetEvent = z.infer<typeof FleetEvent>
export type EventType = FleetEvent['type']
export type EventOfType<T extends EventType> = Extract<FleetEvent, { type: T }>

/** The subject token for each event type: `fleet.events.<deviceId>.<kind>`. */
export const EVENT_KINDS = {
  'sensor.registered': 'registered',
  'reading.recorded': 'reading',
  'heartbeat.received': 'heartbeat',
  'status.changed': 'status',
  'alert.acknowledged': 'alert',
  'clock.ticked': 'tick',
} as const satisfies Record<EventType, string>
export type EventKind = (typeof EVENT_KINDS)[EventType]

/** Events that are about one device (everything but system events such as clock ticks). */
export type DeviceEvent = Exclude<FleetEvent, ClockTicked>
