import type { JetStreamClient, PubAck } from '@nats-io/jetstream'
import { headers as natsHeaders, type MsgHdrs } from '@nats-io/transport-node'
import { context, SpanKind, SpanStatusCode } from '@opentelemetry/api'
import { ExponentialBackoff, handleWhen, retry } from 'cockatiel'
import { v7 as uuidv7 } from 'uuid'
import { FleetEvent, type EventOfType, type EventType } from '../schemas/events.ts'
import { encodeHlc, decodeHlc, type HybridLogicalClock } from '../schemas/hlc.ts'
import { eventSubject, Headers } from '../schemas/subjects.ts'
import { parseOrThrow } from '../schemas/validation.ts'
import { isTransient } from './failures.ts'
import { Attr } from './span-attributes.ts'
import { injectTraceContext, tracer, tracingActive } from './telemetry.ts'

/** What a caller supplies; the publisher fills in ids, HLC and (by default) occurredAt. */
export interface EventDraft<T extends EventType = EventType> {
  readonly type: T
  readonly deviceId: string
  readonly data: EventOfType<T>['data']
  /** Device clock time; defaults to now. */
  readonly occurredAt?: string
  readonly eventId?: string
  /** Continue a correlation chain; a new chain starts with the event's own id. */
  readonly correlationId?: string
  /** The event that caused this one: its HLC is merged first and its ids are carried on. */
  readonly causedBy?: Pick<FleetEvent, 'eventId' | 'correlationId' | 'hlc'>
}

export interface PublishResult {
  readonly event: FleetEvent
  /** Stream sequence; for a duplicate, the sequence of the copy already stored. */
  readonly seq: number
  /** The stream already had this eventId within its duplicate window and stored nothing. */
  readonly duplicate: boolean
}

/** A publish that failed for good (after retries, or for a reason retries cannot fix). */
export class PublishError extends Error {
  override readonly name = 'PublishError'
}

export interface PublisherStats {
  published: number
  duplicates: number
  failed: number
}

/**
 * Publishes fleet events into FLEET_EVENTS with `Nats-Msg-Id` = eventId, the HLC, correlation and
 * causation ids and W3C trace context in the headers, and checks every PubAck.
 *
 * ```ts
 * const publisher = createPublisher(jetstream(nc), { clock })
 * const { seq, duplicate } = await publisher.publish({
 *   type: 'reading.recorded', deviceId: 'sensor-7',
 *   data: { metric: 'temperature', value: 21.5, unit: 'C' },
 * })
 * ```
 */
export interface Publisher {
  /** Stamps, validates and publishes one event; resolves with its PubAck. */
  publish<T extends EventType>(draft: EventDraft<T>, opts?: PublishOptions): Promise<PublishResult>
  /** Publishes a fully formed event as it is (a re-publish keeps its eventId and HLC). */
  publishEvent(event: FleetEvent, opts?: PublishOptions): Promise<PublishResult>
  /** The event `publish` would send, without sending it. */
  stamp<T extends EventType>(draft: EventDraft<T>): EventOfType<T>
  readonly stats: Readonly<PublisherStats>
}

export interface PublishOptions {
  /**
   * Straight into this partition of a partitioned stream, bypassing the server's mapping by
   * device id (the clock's ticks go to every partition). Devices never set it.
   */
  readonly partition?: number
}

export interface PublisherOptions {
  readonly clock: HybridLogicalClock
  /** Time to wait for one PubAck. */
  readonly timeoutMs?: number
  /** Attempts per event for timeouts and "no responders" (e.g. a stream leader election). */
  readonly maxAttempts?: number
}

export function createPublisher(js: JetStreamClient, opts: PublisherOptions): Publisher {
  return new PublisherImpl(js, opts)
}

class PublisherImpl implements Publisher {
  readonly stats: PublisherStats = { published: 0, duplicates: 0, failed: 0 }
  readonly #js: JetStreamClient
  readonly #clock: HybridLogicalClock
  readonly #timeoutMs: number
  readonly #retry

  constructor(js: JetStreamClient, opts: PublisherOptions) {
    this.#js = js
    this.#clock = opts.clock
    this.#timeoutMs = opts.timeoutMs ?? 5000
    // Retrying is safe only because every publish carries its eventId as Nats-Msg-Id.
    this.#retry = retry(handleWhen(isTransient), {
      maxAttempts: opts.maxAttempts ?? 8,
      backoff: new ExponentialBackoff({ initialDelay: 100, maxDelay: 2000 }),
    })
  }

  stamp<T extends EventType>(draft: EventDraft<T>): EventOfType<T> {
    const hlc = draft.causedBy
      ? this.#clock.receive(decodeHlc(draft.causedBy.hlc))
      : this.#clock.now()
    const eventId = draft.eventId ?? uuidv7()
    const event = {
      eventId,
      deviceId: draft.deviceId,
      type: draft.type,
      version: 1,
      occurredAt: draft.occurredAt ?? new Date().toISOString(),
      hlc: encodeHlc(hlc),
      correlationId: draft.correlationId ?? draft.causedBy?.correlationId ?? eventId,
      ...(draft.causedBy ? { causationId: draft.causedBy.eventId } : {}),
      data: draft.data,
    }
    return parseOrThrow(FleetEvent, event, `${draft.type} event`) as EventOfType<T>
  }

  async publish<T extends EventType>(
    draft: EventDraft<T>,
    opts: PublishOptions = {},
  ): Promise<PublishResult> {
    let event: FleetEvent
    try {
      event = this.stamp(draft)
    } catch (err) {
      this.stats.failed++
      throw err
    }
    return this.#send(event, opts.partition)
  }

  async publishEvent(event: FleetEvent, opts: PublishOptions = {}): Promise<PublishResult> {
    try {
      parseOrThrow(FleetEvent, event, `${event.type} event`)
    } catch (err) {
      this.stats.failed++
      throw err
    }
    return this.#send(event, opts.partition)
  }

  /** One producer span per event; its context travels in the headers to every processor. */
  async #send(event: FleetEvent, partition?: number): Promise<PublishResult> {
    const subject = eventSubject(event.deviceId, event.type, partition)
    const body = JSON.stringify(event)
    // Tracing off: no span, attributes or context switch for every event.
    if (!tracingActive()) return this.#deliver(event, subject, body)
    return tracer().startActiveSpan(
      `publish ${event.type}`,
      {
        kind: SpanKind.PRODUCER,
        attributes: {
          [Attr.MessagingSystem]: 'nats',
          [Attr.MessagingOperationType]: 'send',
          [Attr.MessagingOperationName]: 'publish',
          [Attr.MessagingDestination]: subject,
          [Attr.MessagingMessageId]: event.eventId,
          [Attr.MessagingConversationId]: event.correlationId,
          [Attr.MessagingBodySize]: Buffer.byteLength(body),
          [Attr.DeviceId]: event.deviceId,
          [Attr.CorrelationId]: event.correlationId,
          [Attr.Hlc]: event.hlc,
          [Attr.EventType]: event.type,
        },
      },
      async (span) => {
        try {
          const r = await this.#deliver(event, subject, body)
          span.setAttributes({ [Attr.StreamSequence]: r.seq, [Attr.Duplicate]: r.duplicate })
          return r
        } catch (err) {
          if (err instanceof Error) span.recordException(err)
          span.setStatus({ code: SpanStatusCode.ERROR, message: (err as Error).message })
          throw err
        } finally {
          span.end()
        }
      },
    )
  }

  /** Publishes with the eventId as msgID, retrying what is transient; checks the PubAck. */
  async #deliver(event: FleetEvent, subject: string, body: string): Promise<PublishResult> {
    const headers = eventHeaders(event) // inside a producer span, its context goes along
    let ack: PubAck
    try {
      ack = await this.#retry.execute(() =>
        this.#js.publish(subject, body, {
          msgID: event.eventId,
          headers,
          timeout: this.#timeoutMs,
        }),
      )
    } catch (err) {
      this.stats.failed++
      throw new PublishError(
        `publish of event '${event.eventId}' to '${subject}' failed: ${(err as Error).message}`,
        { cause: err },
      )
    }
    if (ack.duplicate) this.stats.duplicates++
    else this.stats.published++
    return { event, seq: ack.seq, duplicate: ack.duplicate }
  }
}

/** The headers every event carries, so `nats stream view --headers` shows them. */
export function eventHeaders(event: FleetEvent): MsgHdrs {
  const h = natsHeaders()
  h.set(Headers.Hlc, event.hlc)
  h.set(Headers.CorrelationId, event.correlationId)
  if (event.causationId !== undefined) h.set(Headers.CausationId, event.causationId)
  h.set(Headers.EventType, event.type)
  // W3C trace context of the active span, if any (a no-op until telemetry is started).
  injectTraceContext(context.active(), h)
  return h
}

/**
 * Keeps up to `window` publishes in flight: far faster than awaiting each PubAck, while memory and
 * the server's outstanding acks stay bounded.
 *
 * ```ts
 * const pipe = new PublishPipeline(publisher, 256, (r) => { if (r.duplicate) dups++ })
 * for (const d of drafts) await pipe.submit(() => publisher.publish(d))
 * await pipe.drain()
 * ```
 */
export class PublishPipeline<R = PublishResult> {
  #inFlight = 0
  /** Settles when every publish started so far has settled. */
  #idle: Promise<void> = Promise.resolve()
  #markIdle: (() => void) | undefined
  /** Submitters waiting for room, woken one per settled publish. */
  readonly #waiting: (() => void)[] = []
  #firstError: Error | undefined

  constructor(
    readonly window: number,
    readonly onResult: (r: R) => void = () => undefined,
  ) {}

  /** Waits for room in the window, then starts the publish. Throws the first failure seen. */
  async submit(start: () => Promise<R>): Promise<void> {
    // One waiter per submitter, woken when a publish settles: O(1) per event, not O(window).
    while (this.#inFlight >= this.window) {
      await new Promise<void>((resolve) => this.#waiting.push(resolve))
    }
    if (this.#firstError !== undefined) throw this.#firstError
    if (this.#inFlight === 0) this.#idle = new Promise((resolve) => (this.#markIdle = resolve))
    this.#inFlight++
    let started: Promise<R>
    try {
      started = start()
    } catch (err) {
      started = Promise.reject(err instanceof Error ? err : new Error(String(err)))
    }
    void started
      .then(
        (r) => {
          this.onResult(r)
        },
        (err: unknown) => {
          this.#fail(err)
        },
      )
      .catch((err: unknown) => {
        this.#fail(err) // onResult threw
      })
      .finally(() => {
        this.#inFlight--
        this.#waiting.shift()?.()
        if (this.#inFlight === 0) this.#markIdle?.()
      })
  }

  #fail(err: unknown): void {
    this.#firstError ??= err instanceof Error ? err : new Error(String(err))
  }

  /** Waits for every publish in flight; throws the first failure seen. */
  async drain(): Promise<void> {
    await this.#idle
    if (this.#firstError !== undefined) throw this.#firstError
  }

  get inFlight(): number {
    return this.#inFlight
  }
}
