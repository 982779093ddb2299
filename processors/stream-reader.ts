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
 * its inactivity threshold). Pulls only as fast as `next` is called, so memory stays bounded by
 * `bufferSize`. One filter subject (nats-server 2.9).
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
  #pending: Promise<IteratorResult<JsMsg>> | undefined
  /** Whether `#pending` has settled: a message taken off the buffer, not handed out yet. */
  #settled = false
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

  /** The next message, or undefined if none arrives within `waitMs`. Throws when the reader stopped. */
  async next(waitMs: number): Promise<JsMsg | undefined> {
    if (this.#pending === undefined) {
      const p = this.#it.next()
      this.#settled = false
      void p.then(
        () => {
          if (this.#pending === p) this.#settled = true
        },
        () => undefined,
      )
      this.#pending = p
    }
    let timer: NodeJS.Timeout | undefined
    const timeout = new Promise<'timeout'>((resolve) => {
      timer = setTimeout(resolve, waitMs, 'timeout')
    })
    try {
      const r = await Promise.race([this.#pending, timeout])
      if (r === 'timeout') return undefined
      this.#pending = undefined
      this.#settled = false
      if (r.done === true) throw new Error('the stream reader stopped')
      this.lastSeq = r.value.info.streamSequence
      this.#lastConsumer = r.value.info.consumer
      this.#lastDelivery = r.value.info.deliverySequence
      this.pending = r.value.info.pending
      return r.value
    } finally {
      clearTimeout(timer)
    }
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
    return this.#settled || this.#messages.getPending() > 0
  }

  async close(): Promise<void> {
    this.#messages.stop()
    await this.#consumer.delete().catch(() => undefined)
  }
}
