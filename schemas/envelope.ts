import * as z from 'zod'
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
/**
 * What Postgres `timestamptz` reads from the ISO form: years 0001 to 9999 (it refuses year 0000,
 * 22008) and UTC offsets within ±15:59 (22009). JS Date reads all of it; the format allows four
 * digit years only, so Postgres's upper bound (294276) and Date's (275760) are never reached.
 */
export const POSTGRES_DATETIME = /^(?!0000)\d{4}-.*(?:Z|[+-](?:0\d|1[0-5]):[0-5]\d)$/
/** ISO 8601 with a zone, as zod checks it. */
const IsoDateTime = z.iso.datetime({ offset: true })
/**
 * The one pattern {@link IsoDateTime} checks (zod's own), for checks that run without zod; should
 * a zod version keep none, a pattern that matches nothing leaves every timestamp to zod.
 */
export const ISO_DATETIME_PATTERN: RegExp = IsoDateTime._zod.def.pattern ?? /(?!)/

/**
 * An ISO 8601 date-time with a zone that Postgres stores as it is.
 *
 * ```ts
 * Timestamp.parse('2026-11-23T10:00:00.000Z') // ok
 * Timestamp.parse('0000-06-01T00:00:00Z')     // refused: year 0000
 * ```
 */
export const Timestamp = IsoDateTime.refine((s) => POSTGRES_DATETIME.test(s), {
  message: 'must be a date-time Postgres can store (year 0001 to 9999, UTC offset within ±15:59)',
  // A string that is no date-time at all is reported once, by the format check.
  when: (payload) => payload.issues.length === 0,
})

/** U+0000: Postgres `text` and `jsonb` cannot hold it (22021, 22P05). */
const NUL = '\u0000'
/** A lone surrogate half: the driver sends U+FFFD in its place (text) or Postgres refuses it (jsonb). */
const LONE_SURROGATE = /\p{Cs}/u

/**
 * Free text up to `max` UTF-16 units that Postgres stores exactly as sent: no U+0000 and no lone
 * surrogate (every other character, control characters included, is kept).
 *
 * ```ts
 * const reason = Text(256) // 'calibration' ok; 'a\u0000b' refused
 * ```
 */
export const Text = (max: number) =>
  z
    .string()
    .max(max)
    .refine((s) => !s.includes(NUL), 'must not contain U+0000 (Postgres text cannot hold it)')
    .refine(
      (s) => !LONE_SURROGATE.test(s),
      'must be well-formed Unicode (no lone surrogate; Postgres would store U+FFFD instead)',
    )

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
