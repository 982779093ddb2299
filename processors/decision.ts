/**
 * The one decision per message (apply, refuse or skip) shared by the live run and a rebuild.
 */
import type { JsMsg } from '@nats-io/jetstream'
import type { ProjectedEvent } from '../projections/projection.ts'
import { decodeEvent, type RejectReason } from '../schemas/decode.ts'
import {
  assertWithinAge,
  assertWithinOffset,
  ClockAgeError,
  ClockSkewError,
  decodeHlc,
  hlcWallMs,
} from '../schemas/hlc.ts'
import type { Config } from '../infra/config.ts'
import { SYSTEM_SOURCE } from '../schemas/envelope.ts'
import { HeaderBlockError, headersOf, type HeaderReader } from './message-headers.ts'
import type { EventKind, FleetEvent } from '../schemas/events.ts'
import {
  EVENTS_SUBJECT_PREFIX,
  Headers,
  parseRedrive,
  REDRIVE_TOKEN,
  partitionOf,
} from '../schemas/subjects.ts'

/**
 * What a processor does with one message off FLEET_EVENTS. The live processor and a rebuild
 * both decide with {@link decide}, so a rebuild refuses, skips and applies exactly what the live
 * run did.
 *
 * - `skip`: a copy put back from the DLQ for another processor (this one applied the original),
 *   or an event of a kind this processor does not read;
 * - `refuse`: bad JSON, schema, subject, header block or clock skew; no attempt can change that;
 * - `apply`: a valid event for the projection.
 */
export type Decision =
  | { readonly kind: 'skip' }
  | { readonly kind: 'refuse'; readonly reason: RejectReason; readonly detail: string }
  | { readonly kind: 'apply'; readonly event: ProjectedEvent }

/** Who decides: a processor's name and the events it reads (a `ProcessorSpec` is one). */
export interface Decider {
  readonly name: string
  readonly reads: EventKind | 'all'
}

/**
 * Decides one message for `processor`. Pure apart from reading the message: time is the stream's
 * append time, never the wall clock, so a replay decides exactly the same way.
 *
 * A copy put back from the DLQ is known by its subject (`...<kind>.redrive.<processor>`, see
 * `redriveSubject`), where only an operator may publish; no header a device can set (`Fleet-*`
 * included) changes what is decided. Every consumer reads the whole stream (or partition), so
 * that a redrive reaches it: events of a kind the processor does not read are skipped here.
 *
 * ```ts
 * const d = decide(msg, readingsProcessor, config)
 * if (d.kind === 'apply') events.push(d.event)
 * ```
 */
export function decide(
  msg: JsMsg,
  processor: Decider,
  config: Pick<Config, 'hlcMaxOffsetMs' | 'hlcMaxAgeMs' | 'partitions'>,
): Decision {
  // Only a subject with a redrive token can be one: parseRedrive would split every subject.
  const redrive = msg.subject.includes(REDRIVE_MARK) ? parseRedrive(msg.subject) : undefined
  if (redrive !== undefined && redrive.processor !== processor.name) return { kind: 'skip' }
  const subject = redrive?.subject ?? msg.subject
  if (processor.reads !== 'all' && !isOfKind(subject, processor.reads, config.partitions !== 0)) {
    return { kind: 'skip' }
  }
  let headers: HeaderReader | undefined
  try {
    headers = headersOf(msg)
  } catch (err) {
    if (err instanceof HeaderBlockError) {
      return { kind: 'refuse', reason: 'invalid-headers', detail: err.message }
    }
    throw err
  }
  const decoded = decodeEvent({
    subject,
    data: msg.data,
    // A redriven copy has its own Nats-Msg-Id (redrive:...), not the eventId.
    msgId: redrive !== undefined ? undefined : headers?.get(Headers.MsgId),
    hlc: headers?.get(Headers.Hlc),
  })
  if (!decoded.ok) return { kind: 'refuse', reason: decoded.reason, detail: decoded.detail }
  const misplaced = misplacedIn(decoded.event, decoded.partition, config.partitions)
  if (misplaced !== undefined)
    return { kind: 'refuse', reason: 'subject-mismatch', detail: misplaced }
  const ingestedAt = new Date(Math.floor(msg.info.timestampNanos / 1e6))
  // A copy put back from the DLQ is appended again, maybe weeks after the original: its age says
  // nothing about the device, and an operator chose to apply it.
  const skew = timeProblem(decoded.event, ingestedAt.getTime(), config, redrive !== undefined)
  if (skew !== undefined) return { kind: 'refuse', reason: 'clock-skew', detail: skew }
  const event = { event: decoded.event, streamSeq: msg.info.streamSequence, ingestedAt }
  return {
    kind: 'apply',
    event: decoded.partition === undefined ? event : { ...event, partition: decoded.partition },
  }
}

/** Built once: a template literal per message is a string per message. */
const REDRIVE_MARK = `.${REDRIVE_TOKEN}.`
const EVENTS_PREFIX = `${EVENTS_SUBJECT_PREFIX}.`
const DOT = 0x2e

/**
 * Whether `subject` is an event of `kind` in the stream's layout: exactly what
 * `subjectMatches(eventsFilter(kind, partitioned ? '*' : undefined), subject)` says
 * (`fleet.events.*.<kind>`, `fleet.events.*.*.<kind>`), without splitting both on every message.
 * The prefix and the last token are the filter's; the dots count the tokens between.
 */
export function isOfKind(subject: string, kind: EventKind, partitioned: boolean): boolean {
  const last = subject.length - kind.length - 1
  if (
    !subject.startsWith(EVENTS_PREFIX) ||
    !subject.endsWith(kind) ||
    subject.charCodeAt(last) !== DOT
  ) {
    return false
  }
  let dots = 0
  for (let i = subject.indexOf('.'); i >= 0; i = subject.indexOf('.', i + 1)) dots++
  return dots === (partitioned ? 4 : 3)
}

/**
 * Why the time an event claims cannot be trusted, if it cannot. Measured against the stream's
 * append time, so a replay decides exactly the same way:
 * - its HLC may be at most `hlcMaxOffsetMs` ahead (a clock ahead would win every last-writer-wins
 *   comparison) and at most `hlcMaxAgeMs` behind. The past bound is far wider than the future
 *   one: a device that buffers while offline (simulator/fleet.ts) replays what it held, stamped
 *   when it happened, after it reconnects; days of that are normal, an HLC of 0 or from 2001 is not;
 * - a clock tick's `data.at` is held to the same bounds: it is stream time, and a tick a year
 *   ahead would make every sensor silent and keep it so (stream time never goes back).
 */
function timeProblem(
  event: FleetEvent,
  appendMs: number,
  config: Pick<Config, 'hlcMaxOffsetMs' | 'hlcMaxAgeMs'>,
  redriven: boolean,
): string | undefined {
  const maxAgeMs = redriven ? Infinity : config.hlcMaxAgeMs
  // Within both bounds (nearly every event): no decoding. NaN (not digits) takes the long way,
  // where decodeHlc says what is wrong with it.
  const wallMs = hlcWallMs(event.hlc)
  const within = wallMs - appendMs <= config.hlcMaxOffsetMs && appendMs - wallMs <= maxAgeMs
  if (!within) {
    try {
      const hlc = decodeHlc(event.hlc)
      assertWithinOffset(hlc, appendMs, config.hlcMaxOffsetMs)
      assertWithinAge(hlc, appendMs, maxAgeMs)
    } catch (err) {
      if (err instanceof ClockSkewError || err instanceof ClockAgeError) return err.message
      throw err
    }
  }
  if (event.type !== 'clock.ticked') return undefined
  const at = Date.parse(event.data.at)
  const stored = new Date(appendMs).toISOString()
  if (at - appendMs > config.hlcMaxOffsetMs) {
    return `'data.at' '${event.data.at}' is ${at - appendMs} ms ahead of the stream's append time ${stored}, more than the max offset of ${config.hlcMaxOffsetMs} ms (HLC_MAX_OFFSET_MS)`
  }
  if (appendMs - at > maxAgeMs) {
    return `'data.at' '${event.data.at}' is ${appendMs - at} ms behind the stream's append time ${stored}, more than the max age of ${config.hlcMaxAgeMs} ms (HLC_MAX_AGE_MS)`
  }
  return undefined
}

/**
 * Why a device event is in the wrong partition, if it is: the server's mapping puts each device in
 * one partition, so an event elsewhere was published straight into a partition (nats-server 2.9
 * checks publish permissions after the mapping, so a device allowed the mapped subjects could).
 * Applying it would let two partitions, perhaps two instances, write one sensor. Clock ticks
 * (`_system`) go into every partition on purpose.
 */
function misplacedIn(
  event: FleetEvent,
  partition: number | undefined,
  partitions: number,
): string | undefined {
  // Without a partition count nothing can be judged (set-up refuses that configuration).
  if (partition === undefined || partitions === 0 || event.deviceId === SYSTEM_SOURCE) {
    return undefined
  }
  const home = partitionOf(event.deviceId, partitions)
  if (partition === home) return undefined
  return `subject partition must be ${home} for device '${event.deviceId}' (FNV-1a of the id modulo ${partitions}, as the server's mapping), got '${partition}'`
}
