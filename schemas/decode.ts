import { EVENT_KINDS, FleetEvent } from './events.ts'
import { plainReading } from './plain-reading.ts'
import { parseEventSubject } from './subjects.ts'
import { describeIssues, formatValue, issuesOf } from './validation.ts'

/** Why an event was refused: a short code for dashboards and a detail line for people. */
export type RejectReason =
  | 'invalid-json'
  | 'invalid-event'
  | 'subject-mismatch'
  /** A header block the NATS client refuses to decode (published raw by a device). */
  | 'invalid-headers'
  | 'clock-skew'
  /** Valid, but the projection failed on it every time. */
  | 'handler-failed'
  /** Valid, but Postgres refused its values (SQLSTATE class 22, 23 or 54: a CHECK, a range). */
  | 'storage-refused'

export type Decoded =
  | {
      readonly ok: true
      readonly event: FleetEvent
      /** The partition token of its subject; `undefined` on a stream that is not partitioned. */
      readonly partition?: number
    }
  | { readonly ok: false; readonly reason: RejectReason; readonly detail: string }

export interface RawEvent {
  readonly subject: string
  readonly data: Uint8Array
  /** The `Nats-Msg-Id` header, when the publisher set one (MQTT devices cannot). */
  readonly msgId?: string | undefined
  /** The `Fleet-Hlc` header, when the publisher set one: it must agree with the body's `hlc`. */
  readonly hlc?: string | undefined
}

const utf8 = new TextDecoder('utf-8', { fatal: true })

/**
 * Bytes off the wire to a validated event, or the reason it is refused. Never throws: bad input
 * is data to park, not an exception to crash on.
 *
 * ```ts
 * const d = decodeEvent({ subject: msg.subject, data: msg.data, msgId: msg.headers?.get('Nats-Msg-Id') })
 * if (!d.ok) park(d.reason, d.detail)
 * ```
 */
export function decodeEvent(raw: RawEvent): Decoded {
  let json: unknown
  try {
    json = JSON.parse(utf8.decode(raw.data))
  } catch (err) {
    return {
      ok: false,
      reason: 'invalid-json',
      detail: `body is not JSON: ${(err as Error).message}`,
    }
  }
  // Most events are plain readings: checked without zod, to the same rules (plain-reading.ts).
  let event: FleetEvent | undefined = plainReading(json)
  if (event === undefined) {
    const parsed = FleetEvent.safeParse(json)
    if (!parsed.success) {
      return {
        ok: false,
        reason: 'invalid-event',
        detail: describeIssues(issuesOf(FleetEvent, json)).join('; '),
      }
    }
    event = parsed.data
  }
  const subject = parseEventSubject(raw.subject)
  const problems: string[] = []
  if (subject === undefined) {
    problems.push(
      `subject must be fleet.events.[<partition>.]<deviceId>.<kind>, got ${formatValue(raw.subject)}`,
    )
  } else {
    if (subject.deviceId !== event.deviceId) {
      problems.push(
        `'deviceId' must equal the subject's device token '${subject.deviceId}', got '${event.deviceId}'`,
      )
    }
    if (subject.kind !== EVENT_KINDS[event.type]) {
      problems.push(
        `subject kind must be '${EVENT_KINDS[event.type]}' for type '${event.type}', got '${subject.kind}'`,
      )
    }
  }
  if (raw.msgId !== undefined && raw.msgId !== '' && raw.msgId !== event.eventId) {
    problems.push(
      `header 'Nats-Msg-Id' must equal 'eventId' '${event.eventId}', got '${raw.msgId}'`,
    )
  }
  if (raw.hlc !== undefined && raw.hlc !== '' && raw.hlc !== event.hlc) {
    problems.push(
      `header 'Fleet-Hlc' must equal 'hlc' ${formatValue(event.hlc)}, got ${formatValue(raw.hlc)}`,
    )
  }
  if (problems.length > 0)
    return { ok: false, reason: 'subject-mismatch', detail: problems.join('; ') }
  return subject?.partition === undefined
    ? { ok: true, event }
    : { ok: true, event, partition: subject.partition }
}
