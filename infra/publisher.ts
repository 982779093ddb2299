import { FleetstreamError } from '../schemas/errors.ts'
import type { JetStreamClient, PubAck } from '@nats-io/jetstream'
import {
  headers as natsHeaders,
  MsgHdrsImpl,
  type Match,
  type MsgHdrs,
  type NatsConnection,
} from '@nats-io/transport-node'
import { context, SpanKind, SpanStatusCode, trace } from '@opentelemetry/api'
import { randomFillSync } from 'node:crypto'
import { v7 as uuidv7 } from 'uuid'
import { FleetEvent, type EventOfType, type EventType } from '../schemas/events.ts'
import { encodeHlc, decodeHlc, type HybridLogicalClock } from '../schemas/hlc.ts'
import { eventSubject, Headers } from '../schemas/subjects.ts'
import { parseOrThrow } from '../schemas/validation.ts'
import { pipelinedPublish, type PipelinedPublish } from './pipelined-publish.ts'
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

/**
 * A publish that failed for good (after retries, or for a reason retries cannot fix): neither
 * retried again nor the operator's mistake, so a command exits 1 with the message, which names
 * the event and why.
 */
export class PublishError extends FleetstreamError {}

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
  /** Publishes sent and waiting for their PubAck (at most the `window` option). */
  readonly inFlight: number
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
  /**
   * Publishes waiting for their PubAck at most; more wait in the publisher, unsent, until one
   * settles. Bounds what the server holds for this publisher whatever the caller does.
   */
  readonly window?: number
}

/**
 * A publisher on the connection of `js` (or on `nc` itself): publishes are pipelined, each with
 * a reply subject under the connection's inbox prefix, so any number are in flight at once.
 */
export function createPublisher(
  js: JetStreamClient | NatsConnection,
  opts: PublisherOptions,
): Publisher {
  return new PublisherImpl(connectionOf(js), opts)
}

function connectionOf(js: JetStreamClient | NatsConnection): NatsConnection {
  // A JetStreamClient made by jetstream(nc) carries its connection (nats.js' JetStreamClientImpl).
  const nc = (js as { nc?: NatsConnection }).nc
  if (nc !== undefined) return nc
  if ('publish' in js && 'subscribe' in js) return js
  throw new TypeError('createPublisher needs a NatsConnection or a JetStreamClient of jetstream()')
}

class PublisherImpl implements Publisher {
  readonly stats: PublisherStats = { published: 0, duplicates: 0, failed: 0 }
  readonly #sender: PipelinedPublish
  readonly #clock: HybridLogicalClock
  /** Re-sending is safe only because every publish carries its eventId as Nats-Msg-Id. */
  readonly #send: { readonly timeoutMs: number; readonly maxAttempts: number }
  readonly #window: number
  #inFlight = 0
  /** Publishes waiting for room in the window, started one per settled publish. */
  readonly #waiting: (() => void)[] = []
  /** Events this publisher stamped (validated, and frozen since). */
  readonly #stamped = new WeakSet<object>()

  constructor(nc: NatsConnection, opts: PublisherOptions) {
    this.#sender = pipelinedPublish(nc)
    this.#clock = opts.clock
    this.#send = { timeoutMs: opts.timeoutMs ?? 5000, maxAttempts: opts.maxAttempts ?? 8 }
    this.#window = opts.window ?? 1024
    if (!(this.#window >= 1)) throw new RangeError(`'window' must be >= 1, got ${opts.window}`)
  }

  get inFlight(): number {
    return this.#inFlight
  }

  stamp<T extends EventType>(draft: EventDraft<T>): EventOfType<T> {
    const valid = this.#stamp(draft)
    // Frozen, so that publishEvent may trust it as validated here (zod is a third of a publish).
    deepFreeze(valid)
    this.#stamped.add(valid)
    return valid
  }

  /**
   * The stamped, validated event. `publish` sends it at once, so it is neither frozen nor kept
   * in the set of stamped events: both cost a publish 4-9 us of its 30-100 us of CPU, measured
   * with the bench's publisher alone at 2,500-40,000 events/s (up to 17 us at the slowest rate).
   */
  #stamp<T extends EventType>(draft: EventDraft<T>): EventOfType<T> {
    const hlc = draft.causedBy
      ? this.#clock.receive(decodeHlc(draft.causedBy.hlc))
      : this.#clock.now()
    const eventId = draft.eventId ?? newEventId()
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

  publish<T extends EventType>(
    draft: EventDraft<T>,
    opts: PublishOptions = {},
  ): Promise<PublishResult> {
    let event: FleetEvent
    try {
      event = this.#stamp(draft)
    } catch (err) {
      this.stats.failed++
      return Promise.reject(toError(err))
    }
    return this.#publish(event, opts.partition)
  }

  publishEvent(event: FleetEvent, opts: PublishOptions = {}): Promise<PublishResult> {
    try {
      if (!this.#stamped.has(event)) parseOrThrow(FleetEvent, event, `${event.type} event`)
    } catch (err) {
      this.stats.failed++
      return Promise.reject(toError(err))
    }
    return this.#publish(event, opts.partition)
  }

  /** One producer span per event; its context travels in the headers to every processor. */
  #publish(event: FleetEvent, partition?: number): Promise<PublishResult> {
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

  /** Publishes with the eventId as Nats-Msg-Id, within the window; checks the PubAck. */
  async #deliver(event: FleetEvent, subject: string, body: string): Promise<PublishResult> {
    // Inside a producer span (or any active span), its context goes along.
    const headers =
      trace.getSpanContext(context.active()) === undefined
        ? encodedEventHeaders(event)
        : eventHeaders(event)
    headers.set(Headers.MsgId, event.eventId)
    // A settling publish hands its slot straight to the first waiter, so none is overtaken.
    if (this.#inFlight >= this.#window) {
      await new Promise<void>((resolve) => this.#waiting.push(resolve))
    } else this.#inFlight++
    let ack: PubAck
    try {
      ack = await this.#sender.publish(subject, Buffer.from(body), headers, this.#send)
    } catch (err) {
      this.stats.failed++
      const why =
        (err as Error).message +
        (err instanceof Error && err.cause instanceof Error ? `: ${err.cause.message}` : '')
      throw new PublishError(`publish of event '${event.eventId}' to '${subject}' failed: ${why}`, {
        cause: err,
      })
    } finally {
      const next = this.#waiting.shift()
      if (next === undefined) this.#inFlight--
      else next()
    }
    if (ack.duplicate) this.stats.duplicates++
    else this.stats.published++
    return { event, seq: ack.seq, duplicate: ack.duplicate }
  }
}

/**
 * Random bytes for event ids, drawn from the CSPRNG a pool at a time: uuid's own source asks
 * WebCrypto for 16 bytes per id, which was 4.6 us of a 12 us stamp (0.3 us this way).
 */
const randomPool = new Uint8Array(4096)
let randomAt = randomPool.length
function pooledRandom16(): Uint8Array {
  if (randomAt + 16 > randomPool.length) {
    randomFillSync(randomPool)
    randomAt = 0
  }
  randomAt += 16
  return randomPool.subarray(randomAt - 16, randomAt)
}

/**
 * A UUIDv7: time-ordered by its millisecond; with a source of its own, uuid draws the rest at
 * random (ids of one millisecond are not ordered among themselves: nothing orders by eventId,
 * events are ordered by HLC).
 */
function newEventId(): string {
  return uuidv7({ rng: pooledRandom16 })
}

function deepFreeze(o: object): void {
  Object.freeze(o)
  for (const v of Object.values(o) as unknown[])
    if (typeof v === 'object' && v !== null) deepFreeze(v)
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
 * {@link eventHeaders} without a trace context, as bytes: nats.js sends `encode()`, and a
 * MsgHdrsImpl built key by key costs a tenth of a publish. The values are the event's validated
 * ids, HLC and type (patterns without CR or LF). Reading or changing them decodes them first.
 */
function encodedEventHeaders(event: FleetEvent): EncodedHeaders {
  let s = `NATS/1.0\r\n${Headers.Hlc}: ${event.hlc}\r\n${Headers.CorrelationId}: ${event.correlationId}\r\n`
  if (event.causationId !== undefined) s += `${Headers.CausationId}: ${event.causationId}\r\n`
  return new EncodedHeaders(`${s}${Headers.EventType}: ${event.type}\r\n`)
}

/**
 * The header bytes `publish` sends for an event outside any span: its headers and `Nats-Msg-Id`
 * (the bench's publish ceiling sends exactly these).
 */
export function eventHeaderBytes(event: FleetEvent): Uint8Array {
  const h = encodedEventHeaders(event)
  h.set(Headers.MsgId, event.eventId)
  return h.encode()
}

/** Headers kept as their wire form until someone reads or changes them. */
class EncodedHeaders implements MsgHdrs {
  /** The header lines so far, each ending in CRLF; undefined once decoded. */
  #lines: string | undefined
  #decoded: MsgHdrsImpl | undefined

  constructor(lines: string) {
    this.#lines = lines
  }

  #h(): MsgHdrsImpl {
    if (this.#decoded === undefined) {
      this.#decoded = MsgHdrsImpl.decode(Buffer.from(`${this.#lines ?? ''}\r\n`))
      this.#lines = undefined
    }
    return this.#decoded
  }

  /** What nats.js writes on the wire. */
  encode(): Uint8Array {
    if (this.#lines !== undefined) return Buffer.from(`${this.#lines}\r\n`)
    return this.#h().encode()
  }

  set(k: string, v: string, match?: Match): void {
    // Appending a header not yet present keeps the wire form (the hot path sets Nats-Msg-Id).
    if (this.#lines !== undefined && k === Headers.MsgId && !/[\r\n]/.test(v)) {
      if (!this.#lines.includes(`\r\n${k}: `)) {
        this.#lines += `${k}: ${v.trim()}\r\n`
        return
      }
    }
    this.#h().set(k, v, match)
  }
  get hasError(): boolean {
    return this.#h().hasError
  }
  get status(): string {
    return this.#h().status
  }
  get code(): number {
    return this.#h().code
  }
  get description(): string {
    return this.#h().description
  }
  get(k: string, match?: Match): string {
    return (this.#h() as MsgHdrs).get(k, match)
  }
  append(k: string, v: string, match?: Match): void {
    this.#h().append(k, v, match)
  }
  has(k: string, match?: Match): boolean {
    return this.#h().has(k, match)
  }
  keys(): string[] {
    return this.#h().keys()
  }
  values(k: string, match?: Match): string[] {
    return this.#h().values(k, match)
  }
  delete(k: string, match?: Match): void {
    this.#h().delete(k, match)
  }
  last(k: string, match?: Match): string {
    return (this.#h() as MsgHdrs).last(k, match)
  }
  [Symbol.iterator](): Iterator<[string, string[]]> {
    return this.#h()[Symbol.iterator]()
  }
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

  /**
   * @param onError each failed publish (a PublishError names its event); without it, the first
   *   failure stops the pipeline: later submits and drain throw it.
   */
  constructor(
    readonly window: number,
    readonly onResult: (r: R) => void = () => undefined,
    readonly onError?: (err: Error) => void,
  ) {}

  /** Waits for room in the window, then starts the publish. Throws the first failure seen. */
  submit(start: () => Promise<R>): Promise<void> {
    if (this.#firstError !== undefined) return Promise.reject(this.#firstError)
    // The common case costs no promise of its own: one `then` per publish, nothing else.
    if (this.#inFlight < this.window) {
      this.#start(start)
      return ROOM
    }
    return this.#submitWhenRoom(start)
  }

  async #submitWhenRoom(start: () => Promise<R>): Promise<void> {
    // One waiter per submitter, woken when a publish settles: O(1) per event, not O(window).
    while (this.#inFlight >= this.window) {
      await new Promise<void>((resolve) => this.#waiting.push(resolve))
    }
    if (this.#firstError !== undefined) throw this.#firstError
    this.#start(start)
  }

  #start(start: () => Promise<R>): void {
    if (this.#inFlight === 0) this.#idle = new Promise((resolve) => (this.#markIdle = resolve))
    this.#inFlight++
    let started: Promise<R>
    try {
      started = start()
    } catch (err) {
      started = Promise.reject(toError(err))
    }
    started.then(this.#succeeded, this.#failed)
  }

  readonly #succeeded = (r: R): void => {
    try {
      this.onResult(r)
    } catch (err) {
      this.#fail(err) // a callback that throws is a failure, not an unhandled rejection
    }
    this.#settled()
  }

  readonly #failed = (err: unknown): void => {
    if (this.onError === undefined) this.#fail(err)
    else {
      try {
        this.onError(toError(err))
      } catch (thrown) {
        this.#fail(thrown)
      }
    }
    this.#settled()
  }

  #settled(): void {
    this.#inFlight--
    this.#waiting.shift()?.()
    if (this.#inFlight === 0) this.#markIdle?.()
  }

  #fail(err: unknown): void {
    this.#firstError ??= toError(err)
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

const ROOM: Promise<void> = Promise.resolve()

function toError(err: unknown): Error {
  return err instanceof Error ? err : new Error(String(err))
}
