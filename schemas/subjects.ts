import { DEVICE_ID_PATTERN, SYSTEM_SOURCE } from './envelope.ts'
import { EVENT_KINDS, type EventKind, type EventType } from './events.ts'

/** Every device event is published under this prefix. */
export const EVENTS_SUBJECT_PREFIX = 'fleet.events'
/** Poison and skewed events are parked under `fleet.dlq.<processor>`. */
export const DLQ_SUBJECT_PREFIX = 'fleet.dlq'
/** Alert notifications go out under `fleet.notifications.alerts.<deviceId>.<notificationId>`. */
export const NOTIFICATIONS_SUBJECT_PREFIX = 'fleet.notifications'

/**
 * `fleet.events.<deviceId>.<kind>` for an event: what devices publish. With partitioned scale-out
 * the server's subject mapping stores it as `fleet.events.<partition>.<deviceId>.<kind>`; giving
 * `partition` addresses one partition directly (the mapping leaves five-token subjects alone).
 */
export function eventSubject(deviceId: string, type: EventType, partition?: number): string {
  const kind = EVENT_KINDS[type]
  return partition === undefined
    ? `${EVENTS_SUBJECT_PREFIX}.${deviceId}.${kind}`
    : `${EVENTS_SUBJECT_PREFIX}.${partition}.${deviceId}.${kind}`
}

/**
 * The subjects of one kind of event (`'all'`: every event) in the stream's layout:
 * - `partition` undefined, a stream that is not partitioned: `fleet.events.*.reading`, `fleet.events.>`
 * - a number, one partition of a partitioned stream: `fleet.events.2.*.reading`, `fleet.events.2.>`
 * - `'*'`, every partition: `fleet.events.*.*.reading`, `fleet.events.>`
 */
export function eventsFilter(kind: EventKind | 'all', partition?: number | '*'): string {
  const p = partition === undefined ? '' : `.${partition}`
  return kind === 'all'
    ? partition === undefined || partition === '*'
      ? ALL_EVENTS
      : `${EVENTS_SUBJECT_PREFIX}${p}.>`
    : `${EVENTS_SUBJECT_PREFIX}${p}.*.${kind}`
}

/** Every event in the stream. */
export const ALL_EVENTS = `${EVENTS_SUBJECT_PREFIX}.>`

/**
 * `filter` as a JetStream consumer's filter subject: none when it is {@link ALL_EVENTS}, the events
 * stream's one subject, so both read the same messages. nats-server 2.9 counts a filtered
 * consumer's pending messages by scanning the stream, at its creation and at every consumer info
 * (the lag sampler asks every few seconds): measured at 300,000 events, 50-80 ms per info with
 * `fleet.events.>` as the filter, 1 ms without one.
 */
export function consumerFilter(filter: string): string | undefined {
  return filter === ALL_EVENTS ? undefined : filter
}

/**
 * The server-side subject mapping of a stream split into `partitions` by device id (nats.conf,
 * inside the account of FLEET_EVENTS): `"fleet.events.*.*": "fleet.events.{{partition(4,1)}}..."`.
 */
export function partitionMapping(partitions: number): { from: string; to: string } {
  return {
    from: `${EVENTS_SUBJECT_PREFIX}.*.*`,
    to: `${EVENTS_SUBJECT_PREFIX}.{{partition(${partitions},1)}}.{{wildcard(1)}}.{{wildcard(2)}}`,
  }
}

/**
 * The partition nats-server's `{{partition(N,1)}}` mapping puts a device's events in: FNV-1a
 * (32 bit) of the device id, modulo N. Computed here too, so a processor can refuse an event
 * that reached a partition other than its device's (published straight into a partition).
 */
export function partitionOf(deviceId: string, partitions: number): number {
  return fnv1a(deviceId) % partitions
}

/** FNV-1a (32 bit) of the UTF-8 bytes of `text`, as nats-server's partition mapping hashes. */
export function fnv1a(text: string): number {
  let h = 0x811c9dc5
  for (const b of Buffer.from(text)) {
    h ^= b
    h = Math.imul(h, 0x01000193) >>> 0
  }
  return h
}

export interface EventSubject {
  readonly deviceId: string
  readonly kind: string
  /** The partition token of a partitioned stream; `undefined` when the stream is not partitioned. */
  readonly partition?: number
}

/**
 * Splits `fleet.events.<deviceId>.<kind>` or `fleet.events.<partition>.<deviceId>.<kind>`;
 * `undefined` when the subject has neither shape.
 */
export function parseEventSubject(subject: string): EventSubject | undefined {
  // By index, not split: this runs for every message every processor decides.
  const start = EVENTS_SUBJECT_PREFIX.length + 1
  if (!subject.startsWith(EVENTS_SUBJECT_PREFIX) || subject.charCodeAt(start - 1) !== DOT) {
    return undefined
  }
  const first = subject.indexOf('.', start)
  if (first < 0) return undefined
  const second = subject.indexOf('.', first + 1)
  let partition: number | undefined
  let deviceId: string
  let kind: string
  if (second < 0) {
    deviceId = subject.slice(start, first)
    kind = subject.slice(first + 1)
  } else {
    if (subject.indexOf('.', second + 1) >= 0) return undefined
    const token = subject.slice(start, first)
    if (!/^(0|[1-9][0-9]{0,3})$/.test(token)) return undefined
    partition = Number(token)
    deviceId = subject.slice(first + 1, second)
    kind = subject.slice(second + 1)
  }
  if (!DEVICE_ID_PATTERN.test(deviceId) && deviceId !== SYSTEM_SOURCE) return undefined
  return partition === undefined ? { deviceId, kind } : { deviceId, kind, partition }
}

const DOT = 0x2e

/** The token that marks an event put back from the DLQ: see {@link redriveSubject}. */
export const REDRIVE_TOKEN = 'redrive'

/**
 * The subject an operator puts a parked event back on, for one processor:
 * `<stored subject>.redrive.<processor>`, e.g. `fleet.events.sensor-7.reading.redrive.readings`
 * or, on a partitioned stream, `fleet.events.2.sensor-7.reading.redrive.readings`. Devices may
 * publish only `fleet.events.<deviceId>.<kind>` (four tokens), so only an operator can put an
 * event here; FLEET_EVENTS stores it (`fleet.events.>`), the server's partition mapping leaves it
 * alone, and every processor's consumer receives it (each reads `fleet.events.>` or
 * `fleet.events.<partition>.>`). The marker is trusted from the subject only, never from a header.
 */
export function redriveSubject(storedSubject: string, processor: string): string {
  return `${storedSubject}.${REDRIVE_TOKEN}.${processor}`
}

/** A redrive subject split: the original's subject and the processor it is for. */
export interface Redrive {
  readonly subject: string
  readonly processor: string
}

/** The parts of a {@link redriveSubject}; `undefined` for any other subject. */
export function parseRedrive(subject: string): Redrive | undefined {
  const tokens = subject.split('.')
  if (tokens.length < 6 || tokens[tokens.length - 2] !== REDRIVE_TOKEN) return undefined
  if (`${tokens[0]}.${tokens[1]}` !== EVENTS_SUBJECT_PREFIX) return undefined
  const processor = tokens[tokens.length - 1] ?? ''
  if (processor === '') return undefined
  return { subject: tokens.slice(0, -2).join('.'), processor }
}

/** The header names fleetstream sets; `nats stream view --headers` shows them. */
export const Headers = {
  /** JetStream's dedup key; always the eventId. */
  MsgId: 'Nats-Msg-Id',
  Hlc: 'Fleet-Hlc',
  CorrelationId: 'Fleet-Correlation-Id',
  CausationId: 'Fleet-Causation-Id',
  EventType: 'Fleet-Event-Type',
  /** W3C trace context. */
  TraceParent: 'traceparent',
  TraceState: 'tracestate',
  DlqProcessor: 'Fleet-Dlq-Processor',
  DlqReason: 'Fleet-Dlq-Reason',
  DlqDetail: 'Fleet-Dlq-Detail',
  DlqAttempts: 'Fleet-Dlq-Attempts',
  DlqDeliveries: 'Fleet-Dlq-Deliveries',
  DlqSubject: 'Fleet-Dlq-Subject',
  DlqStream: 'Fleet-Dlq-Stream',
  DlqStreamSeq: 'Fleet-Dlq-Stream-Seq',
  /** On a DLQ entry: what identifies the parked event (its eventId, or stream:seq). */
  DlqKey: 'Fleet-Dlq-Key',
  /**
   * On a DLQ entry, once per original header: `<name>: <value>`, escaped so that no copied text
   * reads as a header the server obeys (see processors/dlq/park.ts).
   */
  DlqHeader: 'Fleet-Dlq-Header',
  /** On a DLQ entry whose original headers were cut to the budget: `kept <n> of <total>`. */
  DlqHeadersCut: 'Fleet-Dlq-Headers-Cut',
  /** On a DLQ entry whose body was cut to the budget: `kept <n> of <total> bytes`. */
  DlqBodyCut: 'Fleet-Dlq-Body-Cut',
  /**
   * On an event put back from the DLQ, for people: the stream sequence of the original. Nothing
   * trusts it: the redrive subject ({@link redriveSubject}) is the marker.
   */
  RedriveOf: 'Fleet-Redrive-Of',
  /** Entries parked by earlier versions kept the original Nats-* headers under this prefix. */
  DlqOriginalPrefix: 'Fleet-Dlq-Original-',
} as const

/**
 * The subject of one alert notification. Unique per notification, so the outbox relay can ask the
 * stream whether it was already sent; subscribers filter by severity and device:
 * `fleet.notifications.alerts.critical.>` or `fleet.notifications.alerts.*.sensor-7.*`.
 */
export function notificationSubject(
  severity: string,
  deviceId: string,
  notificationId: string,
): string {
  return `${NOTIFICATIONS_SUBJECT_PREFIX}.alerts.${severity}.${deviceId}.${notificationId}`
}

/** A NATS subject matches a filter (`*` one token, `>` the rest). */
export function subjectMatches(filter: string, subject: string): boolean {
  const f = filter.split('.')
  const s = subject.split('.')
  for (let i = 0; i < f.length; i++) {
    if (f[i] === '>') return s.length > i
    if (i >= s.length || (f[i] !== '*' && f[i] !== s[i])) return false
  }
  return f.length === s.length
}
