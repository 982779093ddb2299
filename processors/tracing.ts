/**
 * The OpenTelemetry spans of a processed batch and of each of its events.
 */
import type { JsMsg } from '@nats-io/jetstream'
import {
  INVALID_SPAN_CONTEXT,
  SpanKind,
  SpanStatusCode,
  trace,
  type Link,
  type Span,
} from '@opentelemetry/api'
import { Attr } from '../infra/span-attributes.ts'
import { extractTraceContext, tracer, tracingActive } from '../infra/telemetry.ts'
import { parseEventSubject, Headers } from '../schemas/subjects.ts'
import { readableHeaders } from './message-headers.ts'

/**
 * Spans of one processed batch, after the OpenTelemetry messaging conventions for batch
 * consumers: a `process` span for the batch (its transaction's database spans beneath it) with a
 * link to every event's producer context, and per event a `process` span in the event's own trace
 * (child of the producer span, linked to the batch), so one event is followed in Jaeger from the
 * publisher through every processor.
 */
export class BatchSpans {
  readonly batch: Span
  readonly #processor: string
  readonly #events = new Map<JsMsg, Span>()
  readonly #parked = new Set<JsMsg>()
  readonly #on: boolean

  /** Whether per-event spans are recorded: without, {@link event} need not be called. */
  get tracing(): boolean {
    return this.#on
  }

  constructor(processor: string, filterSubject: string, msgs: readonly JsMsg[]) {
    this.#processor = processor
    this.#on = tracingActive()
    if (!this.#on) {
      // Tracing off: no links, attributes or per-event spans to build for every message.
      this.batch = trace.wrapSpanContext(INVALID_SPAN_CONTEXT)
      return
    }
    const links: Link[] = []
    for (const m of msgs) {
      const sc = trace.getSpanContext(extractTraceContext(readableHeaders(m)))
      if (sc && trace.isSpanContextValid(sc)) {
        links.push({ context: sc, attributes: messageAttributes(m) })
      }
    }
    this.batch = tracer(processor).startSpan(`process ${filterSubject}`, {
      kind: SpanKind.CONSUMER,
      links,
      attributes: {
        [Attr.MessagingSystem]: 'nats',
        [Attr.MessagingOperationType]: 'process',
        [Attr.MessagingOperationName]: 'process',
        [Attr.MessagingDestination]: filterSubject,
        [Attr.MessagingConsumerGroup]: processor,
        [Attr.MessagingBatchCount]: msgs.length,
        [Attr.Processor]: processor,
        ...(msgs.length > 0
          ? {
              'fleetstream.stream.sequence.first': msgs[0]?.info.streamSequence,
              'fleetstream.stream.sequence.last': msgs[msgs.length - 1]?.info.streamSequence,
            }
          : {}),
      },
    })
  }

  /** Starts the span of one event this processor works on. */
  event(msg: JsMsg, fields?: { correlationId?: string; hlc?: string }): Span {
    if (!this.#on) return this.batch
    const span = tracer(this.#processor).startSpan(
      `process ${parseEventSubject(msg.subject)?.kind ?? msg.subject}`,
      {
        kind: SpanKind.CONSUMER,
        links: [{ context: this.batch.spanContext() }],
        attributes: {
          ...messageAttributes(msg),
          [Attr.MessagingSystem]: 'nats',
          [Attr.MessagingOperationType]: 'process',
          [Attr.MessagingOperationName]: 'process',
          [Attr.MessagingDestination]: msg.subject,
          [Attr.MessagingConsumerGroup]: this.#processor,
          [Attr.Processor]: this.#processor,
          ...(fields?.correlationId ? { [Attr.CorrelationId]: fields.correlationId } : {}),
          ...(fields?.hlc ? { [Attr.Hlc]: fields.hlc } : {}),
        },
      },
      extractTraceContext(readableHeaders(msg)),
    )
    this.#events.set(msg, span)
    return span
  }

  spanOf(msg: JsMsg): Span | undefined {
    return this.#events.get(msg)
  }

  /** The event was refused and parked in the DLQ. */
  parked(msg: JsMsg, reason: string, detail: string): void {
    const span = this.#events.get(msg)
    if (!span) return
    this.#parked.add(msg)
    span.setAttributes({ [Attr.Outcome]: 'parked', [Attr.DlqReason]: reason })
    span.setStatus({ code: SpanStatusCode.ERROR, message: `${reason}: ${detail}` })
  }

  /** The batch is committed and acked: every event span that was not parked was applied. */
  committed(checkpoint: number): void {
    for (const [msg, span] of this.#events) {
      if (!this.#parked.has(msg)) span.setAttribute(Attr.Outcome, 'applied')
      span.end()
    }
    this.batch.setAttribute('fleetstream.checkpoint', checkpoint)
    this.batch.end()
  }

  /** The batch failed uncommitted: its events will be delivered again. */
  failed(err: unknown): void {
    const message = err instanceof Error ? err.message : String(err)
    for (const span of this.#events.values()) {
      span.setAttribute(Attr.Outcome, 'not-committed')
      span.setStatus({ code: SpanStatusCode.ERROR, message })
      span.end()
    }
    if (err instanceof Error) this.batch.recordException(err)
    this.batch.setStatus({ code: SpanStatusCode.ERROR, message })
    this.batch.end()
  }
}

function messageAttributes(m: JsMsg): Record<string, string | number> {
  const a: Record<string, string | number> = {
    [Attr.StreamSequence]: m.info.streamSequence,
    [Attr.DeliveryCount]: m.info.deliveryCount,
  }
  const headers = readableHeaders(m)
  const id = headers?.get(Headers.MsgId)
  if (id) a[Attr.MessagingMessageId] = id
  const device = parseEventSubject(m.subject)?.deviceId
  if (device) a[Attr.DeviceId] = device
  const correlation = headers?.get(Headers.CorrelationId)
  if (correlation) a[Attr.CorrelationId] = correlation
  const hlc = headers?.get(Headers.Hlc)
  if (hlc) a[Attr.Hlc] = hlc
  return a
}
