/**
 * Reads a stream range in order through an ordered consumer (rebuild, replay, the DLQ's readers).
 */
import {
  DeliverPolicy,
  type Consumer,
  type ConsumerMessages,
  type JetStreamClient,
  type JsMsg,
} from '@nats-io/jetstream'
import { consumerFilter } from '../schemas/subjects.ts'

/** Where a {@link StreamReader} starts: a stream sequence, or the first event stored at or after a time. */
export type ReadFrom = { readonly seq: number } | { readonly time: Date }

/**
 * Reads a stream in order through an ordered consumer (ephemeral, no acks, recreated by the client
 * on a gap; nothing is left on the server when the reader goes away: the server deletes it after
 * its inactivity threshold). Pulls only as fast as messages are handed out, so memory stays bounded
 * by `bufferSize` plus {@link READ_AHEAD}. One filter subject (nats-server 2.9).
 *
 * ```ts
 * const reader = await StreamReader.open(js, 'FLEET_EVENTS', 'fleet.events.*.reading', { seq: 1 })
 * for (let m = await reader.next(100); m; m = await reader.next(100)) apply(m)
 * await reader.close()
 * ```
 */
export class StreamReader {
  readonly #consumer: Consumer
  readonly #messages: ConsumerMessages
  readonly #it: AsyncIterator<JsMsg>
  /**
   * Messages taken off the client's iterator, not handed out yet: `#ahead[#head..]`. A pump moves
   * them here as they arrive (at most {@link READ_AHEAD}), so that handing out a buffered message
   * is an array read: `next` used to arm a timer and race it against the iterator for every
   * message, ~5 us each, most of a rebuild's reading cost.
   */
  #ahead: (JsMsg | undefined)[] = []
  #head = 0
  /** Why no more messages will come: the iterator stopped or failed. Set once. */
  #ended: { readonly error: unknown } | undefined
  /** Wakes a `next` waiting for a message or the end (once). */
  #onArrival: (() => void) | undefined
  /** Wakes the pump waiting for room. */
  #onRoom: (() => void) | undefined
  /** The consumer (an ordered consumer is recreated on a gap) and delivery count of the newest message handed out. */
  #lastConsumer: string | undefined
  #lastDelivery = 0
  /** Stream sequence of the newest message handed out; 0 before the first. */
  lastSeq = 0
  /** Messages left after the newest one handed out, as the server counted when it sent it. */
  pending: number | undefined

  private constructor(consumer: Consumer, messages: ConsumerMessages) {
    this.#consumer = consumer
    this.#messages = messages
    this.#it = messages[Symbol.asyncIterator]()
    void this.#pump()
  }

  static async open(
    js: JetStreamClient,
    stream: string,
    filterSubject: string,
    from: ReadFrom,
    opts: { readonly bufferSize?: number; readonly headersOnly?: boolean } = {},
  ): Promise<StreamReader> {
    const filter = consumerFilter(filterSubject)
    const consumer = await js.consumers.get(stream, {
      ...(filter !== undefined ? { filter_subjects: filter } : {}),
      ...(opts.headersOnly === true ? { headers_only: true } : {}),
      ...('seq' in from
        ? { deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: from.seq }
        : { deliver_policy: DeliverPolicy.StartTime, opt_start_time: from.time.toISOString() }),
    })
    const messages = await consumer.consume({ max_messages: opts.bufferSize ?? 2000 })
    return new StreamReader(consumer, messages)
  }

  /**
   * The next message, or undefined if none arrives within `waitMs`. Throws when the reader stopped.
   * One caller at a time (a second waiting call would only wake at its `waitMs`).
   */
  async next(waitMs: number): Promise<JsMsg | undefined> {
    const ready = this.poll()
    if (ready !== undefined) return ready
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, waitMs)
      this.#onArrival = () => {
        this.#onArrival = undefined
        clearTimeout(timer)
        // Once the pump has moved every message that came with this one (microtasks run first):
        // woken per message, `next` armed a timer per message again.
        setImmediate(resolve)
      }
    })
    this.#onArrival = undefined
    return this.poll()
  }

  /**
   * A message already received, or undefined when none is (without waiting: {@link next} waits).
   * Throws when the reader stopped and every message it received was handed out.
   *
   * ```ts
   * const m = reader.poll() ?? (await reader.next(250))
   * ```
   */
  poll(): JsMsg | undefined {
    if (this.#head === this.#ahead.length) {
      if (this.#ended !== undefined) throw this.#ended.error
      return undefined
    }
    const m = this.#ahead[this.#head] as JsMsg
    this.#ahead[this.#head++] = undefined
    if (this.#head === this.#ahead.length) {
      this.#ahead = []
      this.#head = 0
    } else if (this.#head >= COMPACT_AT && this.#head * 2 >= this.#ahead.length) {
      // The pump refills while messages are handed out, so the buffer may never empty: drop the
      // handed-out slots, or a long read would keep one per message it ever read.
      this.#ahead = this.#ahead.slice(this.#head)
      this.#head = 0
    }
    if (this.#onRoom !== undefined && this.#ahead.length - this.#head <= READ_AHEAD / 2) {
      this.#onRoom()
      this.#onRoom = undefined
    }
    const info = m.info
    this.lastSeq = info.streamSequence
    this.#lastConsumer = info.consumer
    this.#lastDelivery = info.deliverySequence
    this.pending = info.pending
    return m
  }

  /** Moves received messages from the client's iterator to `#ahead`, until it ends. */
  async #pump(): Promise<void> {
    try {
      for (;;) {
        if (this.#ahead.length - this.#head >= READ_AHEAD) {
          await new Promise<void>((resolve) => (this.#onRoom = resolve))
          if (this.#ended !== undefined) return
        }
        const r = await this.#it.next()
        if (r.done === true) {
          this.#ended = { error: new Error('the stream reader stopped') }
          break
        }
        this.#ahead.push(r.value)
        this.#onArrival?.()
      }
    } catch (err) {
      this.#ended = { error: err }
    }
    this.#onArrival?.()
  }

  /**
   * True when every message stored so far has been handed out: asks the server (the counts on the
   * messages may be old). Used where "nothing more up to here" must be certain.
   *
   * Decided by delivery counts, not stream sequences: on a filtered consumer nats-server 2.9
   * reports `delivered.stream_seq` as the stream's last sequence (past the last message that
   * matches), so waiting for the last message handed out to reach it never ends. Here: nothing
   * left on the server (`num_pending`), nothing received and not handed out, and every message
   * the server says it delivered (`delivered.consumer_seq`) handed out (none in flight).
   */
  async drained(): Promise<boolean> {
    if (this.#buffered()) return false
    const info = await this.#consumer.info(false)
    if (info.num_pending > 0 || this.#buffered()) return false
    // An ordered consumer recreated after a gap counts its deliveries from 1 again.
    return info.name === this.#lastConsumer
      ? info.delivered.consumer_seq <= this.#lastDelivery
      : info.delivered.consumer_seq === 0
  }

  /** Whether a message was received and not handed out yet. */
  #buffered(): boolean {
    // Not the client's `getPending()`: it counts a pull request queued among the messages as one
    // until its next batch, so after most long reads it said "buffered" for good (and `drained`
    // false). A message the client holds and the pump has not moved yet is one the server counts
    // as delivered: the delivery check of `drained` says false for it.
    return this.#head < this.#ahead.length
  }

  async close(): Promise<void> {
    this.#messages.stop()
    // A pump waiting for room reads on to the iterator's end.
    this.#onRoom?.()
    await this.#consumer.delete().catch(() => undefined)
  }
}

/**
 * Most messages the pump takes off the client's iterator ahead of `next`/`poll`, beyond the
 * client's own buffer (`bufferSize`); it waits until half of them are handed out.
 */
const READ_AHEAD = 1000
/** Handed-out slots of the read-ahead buffer dropped at once (see `poll`). */
const COMPACT_AT = 4096
