import { DEVICE_ID_PATTERN, SYSTEM_SOURCE } from './envelope.ts'
import { EVENT_KINDS, type EventKind, type EventType } from './events.ts'

/** Every device event is published under this prefix. */
export const EVENTS_SUBJECT_PREFIX = 'fleet.events'
/** Poison and skewed events are parked under `fleet.dlq.<processor>`. */
export const DLQ_SUBJECT_PREFIX = 'fleet.dlq'
/** Alert notifications go out under `fleet.notifications.alerts.<deviceId>.<notificationId>`. */
export const NOTIFICATIONS_SUBJECT_PREFIX = 'fleet.notifications'

/** `fleet.events.<deviceId>.<kind>` for an event. */
export function eventSubject(deviceId: string, type: EventType): string {
  return `${EVENTS_SUBJECT_PREFIX}.${deviceId}.${EVENT_KINDS[type]}`
}

/** A filter for one kind of event from every device, e.g. `fleet.events.*.reading`. */
export function kindFilter(kind: EventKind | '*'): string {
  return `${EVENTS_SUBJECT_PREFIX}.*.${kind}`
}

/** Every event in the stream. */
export const ALL_EVENTS = `${EVENTS_SUBJECT_PREFIX}.>`

export interface EventSubject {
  readonly deviceId: string
  readonly kind: string
}

/** Splits `fleet.events.<deviceId>.<kind>`; `undefined` when the subject does not have that shape. */
export function parseEventSubject(subject: string): EventSubject | undefined {
  const tokens = subject.split('.')
  if (tokens.length !== 4 || `${tokens[0]}.${tokens[1]}` !== EVENTS_SUBJECT_PREFIX) return undefined
  const [, , deviceId = '', kind = ''] = tokens
  return DEVICE_ID_PATTERN.test(deviceId) || deviceId === SYSTEM_SOURCE
    ? { deviceId, kind }
    : undefined
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
  /** On an event put back from the DLQ: the one processor that should apply it again. */
  RedriveFor: 'Fleet-Redrive-For',
  /** On an event put back from the DLQ: the stream sequence of the original. */
  RedriveOf: 'Fleet-Redrive-Of',
  /** Prefix for original headers that JetStream would interpret (Nats-*) when copied into the DLQ. */
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
