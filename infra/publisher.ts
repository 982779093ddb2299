import type { JetStreamClient, PubAck } from '@nats-io/jetstream'
import { headers as natsHeaders, type MsgHdrs } from '@nats-io/transport-node'
import { context, propagation } from '@opentelemetry/api'
import { ExponentialBackoff, handleWhen, retry } from 'cockatiel'
import { v7 as uuidv7 } from 'uuid'
import { FleetEvent, type EventOfType, type EventType } from '../schemas/events.ts'
import { encodeHlc, decodeHlc, type HybridLogicalClock } from '../schemas/hlc.ts'
import { eventSubject, Headers } from '../schemas/subjects.ts'
import { parseOrThrow } from '../schemas/validation.ts'
import { isTransient } from './failures.ts'

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
  publish<T extends EventType>(draft: EventDraft<T>): Promise<PublishResult>
  /** Publishes a fully formed event as it is (a re-publish keeps its eventId and HLC). */
  publishEvent(event: FleetEvent): Promise<PublishResult>
  /** The event `publish` would send, without sending it. */
  stamp<T extends EventType>(draft: EventDraft<T>): EventOfType<T>
  readonly stats: Readonly<PublisherStats>
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

  async publish<T extends EventType>(draft: EventDraft<T>): Promise<PublishResult> {
    let event: FleetEvent
    try {
      event = this.stamp(draft)
    } catch (err) {
      this.stats.failed++
      throw err
    }
    return this.#send(event)
  }

  async publishEvent(event: FleetEvent): Promise<PublishResult> {
    try {
      parseOrThrow(FleetEvent, event, `${event.type} event`)
    } catch (err) {
      this.stats.failed++
      throw err
    }
    return this.#send(event)
  }

  async #send(event: FleetEvent): Promise<PublishResult> {
    const subject = eventSubject(event.deviceId, event.type)
    const body = JSON.stringify(event)
    const hdrs = eventHeaders(event)
    let ack: PubAck
    try {
      ack = await this.#retry.execute(() =>
        this.#js.publish(subject, body, {
          msgID: event.eventId,
          headers: hdrs,
          timeout: this.#timeoutMs,
        }),
      )
    } catch (err) {
      this.stats.failed++
      throw new PublishError(
        `publish of event '${event.eventId}' to '${subject}' failed: ${(err as Error).message}`,
        {
          cause: err,
        },
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
  // W3C trace context of the active span, if any (a no-op until a tracer and propagator are set).
  propagation.inject(context.active(), h, {
    set: (carrier, key, value) => {
      carrier.set(key, value)
    },
  })
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
export class PublishPipeline {
  readonly #inFlight = new Set<Promise<void>>()
  #firstError: Error | undefined

  constructor(
    readonly window: number,
    readonly onResult: (r: PublishResult) => void = () => undefined,
  ) {}

  /** Waits for room in the window, then starts the publish. Throws the first failure seen. */
  async submit(start: () => Promise<PublishResult>): Promise<void> {
    while (this.#inFlight.size >= this.window) await Promise.race(this.#inFlight)
    if (this.#firstError !== undefined) throw this.#firstError
    const p: Promise<void> = start()
      .then(this.onResult, (err: unknown) => {
        this.#firstError ??= err instanceof Error ? err : new Error(String(err))
      })
      .finally(() => this.#inFlight.delete(p))
    this.#inFlight.add(p)
  }

  /** Waits for every publish in flight; throws the first failure seen. */
  async drain(): Promise<void> {
    await Promise.all(this.#inFlight)
    if (this.#firstError !== undefined) throw this.#firstError
  }

  get inFlight(): number {
    return this.#inFlight.size
  }
}
