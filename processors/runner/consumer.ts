/**
 * A slot's durable consumer: its spec and config, anchoring it at the checkpoint, its info, and the
 * bounded buffer its messages wait in.
 */
import {
  AckPolicy,
  DeliverPolicy,
  JetStreamApiCodes,
  JetStreamApiError,
  ReplayPolicy,
  type ConsumerConfig,
  type ConsumerInfo,
  type JetStreamManager,
  type JsMsg,
} from '@nats-io/jetstream'
import { nanos } from '@nats-io/transport-node'
import type { Config } from '../../infra/config.ts'
import { consumerFilter } from '../../schemas/subjects.ts'
import type { Slot } from '../partitions.ts'
import type { CheckpointPosition } from '../progress/checkpoints.ts'

export interface ConsumerSpec {
  readonly stream: string
  /** Durable name; the same as the processor's name and checkpoint key. */
  readonly name: string
  readonly filterSubject: string
  readonly maxAckPending: number
  readonly ackWaitSeconds: number
}

/** The durable consumer of one slot of a processor (one per partition). */
export function consumerSpecOf(slot: Slot, config: Config): ConsumerSpec {
  return {
    stream: config.streams.events,
    name: slot.key,
    filterSubject: slot.filterSubject,
    maxAckPending: config.processor.maxAckPending,
    ackWaitSeconds: config.processor.ackWaitSeconds,
  }
}

/** The durable consumer config for a processor whose checkpoint is at `from`. */
export function consumerConfig(
  spec: ConsumerSpec,
  from: CheckpointPosition,
): Partial<ConsumerConfig> {
  const filter = consumerFilter(spec.filterSubject)
  return {
    durable_name: spec.name,
    description: `fleetstream ${spec.name} processor (its checkpoint in Postgres is the source of truth)`,
    ...(filter !== undefined ? { filter_subject: filter } : {}),
    // Acking the last message of a batch acks the batch: one ack per commit.
    ack_policy: AckPolicy.All,
    ...(from.lastSeq > 0
      ? { deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: from.lastSeq + 1 }
      : { deliver_policy: DeliverPolicy.All }),
    ack_wait: nanos(spec.ackWaitSeconds * 1000),
    max_ack_pending: spec.maxAckPending,
    // Unlimited: the server must never drop an event on its own. Poison is parked by the processor.
    max_deliver: -1,
    replay_policy: ReplayPolicy.Instant,
  }
}

export type AnchorResult = 'created' | 'reused' | 'recreated'

/**
 * Makes the durable consumer deliver exactly from the checkpoint on. The consumer is reused only
 * when the server's view agrees with Postgres (ack floor at the checkpoint, nothing in flight,
 * same settings); otherwise it is recreated at checkpoint + 1. This matters with AckPolicy.All:
 * messages delivered to a crashed instance but never applied would otherwise be acked by the
 * next batch's ack and skipped.
 */
export async function anchorConsumer(
  jsm: JetStreamManager,
  spec: ConsumerSpec,
  from: CheckpointPosition,
): Promise<AnchorResult> {
  const want = consumerConfig(spec, from)
  const info = await consumerInfo(jsm, spec.stream, spec.name)
  if (info !== undefined && agrees(info, want, from)) return 'reused'
  if (info !== undefined) await jsm.consumers.delete(spec.stream, spec.name)
  await jsm.consumers.add(spec.stream, want)
  return info === undefined ? 'created' : 'recreated'
}

function agrees(
  info: ConsumerInfo,
  want: Partial<ConsumerConfig>,
  from: CheckpointPosition,
): boolean {
  const c = info.config
  return (
    (c.filter_subject || undefined) === want.filter_subject &&
    c.ack_policy === want.ack_policy &&
    c.max_ack_pending === want.max_ack_pending &&
    c.ack_wait === want.ack_wait &&
    (c.max_deliver ?? -1) === -1 &&
    info.ack_floor.stream_seq === from.lastSeq &&
    info.delivered.stream_seq === from.lastSeq &&
    info.num_ack_pending === 0
  )
}

export async function consumerInfo(
  jsm: JetStreamManager,
  stream: string,
  name: string,
): Promise<ConsumerInfo | undefined> {
  try {
    return await jsm.consumers.info(stream, name)
  } catch (err) {
    if (err instanceof JetStreamApiError && err.code === JetStreamApiCodes.ConsumerNotFound)
      return undefined
    throw err
  }
}

/**
 * Messages pushed by a consume() callback, taken out in batches: waits for the first message,
 * then for more until the batch is full, or until it holds {@link FILL_DIVISOR | a quarter} of
 * it or its oldest message has waited the linger, and the commit in flight has settled (the
 * batch could not be committed before it anyway). A busy stream gives full batches; a steady one
 * batches what arrived during the linger and the commit before (group commit). Its size is
 * bounded by the consumer's max_ack_pending, not by this class.
 */
export class MessageBuffer {
  #items: JsMsg[] = []
  #wake: (() => void) | undefined
  /** How many messages the waiting take needs: a push below that wakes nobody. */
  #want = 1
  #closed = false
  /** When the oldest message in the buffer arrived (performance.now()). */
  #oldestAt = 0

  push(m: JsMsg): void {
    if (this.#items.length === 0) this.#oldestAt = performance.now()
    this.#items.push(m)
    if (this.#items.length >= this.#want) this.#notify()
  }

  close(): void {
    this.#closed = true
    this.#notify()
  }

  get size(): number {
    return this.#items.length
  }

  get closed(): boolean {
    return this.#closed
  }

  /**
   * Up to `max` messages; an empty array once closed or aborted. Once the first message is
   * there, waits for a full batch until the batch holds a quarter of `max` or its oldest message
   * has waited `lingerMs`, and as long as `busy` (the commit before this batch) has not settled.
   *
   * Each commit costs a few ms of CPU across the processor, Postgres and NATS whatever its size
   * (round trips, the fence, the checkpoint and mark, the ack, the projection's statements): at
   * 100 events a batch that doubled the CPU per event of a 1,000-event batch (measured, three
   * processors on one backlog). At a steady rate a fixed linger gives batches of what arrives in
   * it, so the linger runs until the batch is worth its commit (a quarter full), bounded by
   * `lingerMs` for the events' latency; it counts from the oldest message's arrival, so what
   * waited through the commit before is not held again.
   */
  async take(
    max: number,
    lingerMs: number,
    signal: AbortSignal,
    busy?: Promise<unknown>,
  ): Promise<JsMsg[]> {
    while (this.#items.length === 0 && !this.#closed && !signal.aborted) {
      await this.#wait(signal, 1, undefined)
    }
    let settled = busy === undefined
    if (busy !== undefined) {
      const done = () => {
        settled = true
        this.#notify()
      }
      void busy.then(done, done)
    }
    const fill = Math.ceil(max / FILL_DIVISOR)
    while (this.#items.length < max && !this.#closed && !signal.aborted) {
      const left = this.#oldestAt + lingerMs - performance.now()
      const filled = this.#items.length >= fill
      if (settled && (filled || left <= 0)) break
      // Filled (or lingered out) but committing: only the settle or a full batch ends the wait.
      const want = filled || left <= 0 ? max : fill
      await this.#wait(signal, want, left > 0 && !filled ? left : undefined)
    }
    if (signal.aborted) return []
    const batch = this.#items.splice(0, max)
    // What stays arrived after the batch's messages; it has waited no longer than this.
    if (this.#items.length > 0) this.#oldestAt = performance.now()
    return batch
  }

  #notify(): void {
    const wake = this.#wake
    this.#wake = undefined
    wake?.()
  }

  /** Until `want` messages are there, `ms` have passed, or a close, abort or notify. */
  #wait(signal: AbortSignal, want: number, ms: number | undefined): Promise<void> {
    return new Promise<void>((resolve) => {
      const done = () => {
        clearTimeout(timer)
        signal.removeEventListener('abort', done)
        this.#want = 1
        resolve()
      }
      const timer = ms === undefined ? undefined : setTimeout(done, ms)
      signal.addEventListener('abort', done, { once: true })
      this.#want = want
      this.#wake = done
    })
  }
}

/**
 * A batch stops lingering once it holds 1/FILL_DIVISOR of its maximum: from ~250 events on (the
 * default 1,000), a commit's fixed costs are a small part of its events' (see
 * {@link MessageBuffer.take}).
 */
export const FILL_DIVISOR = 4

/**
 * Creates the consumer at checkpoint + 1 if it does not exist; an existing one is left to its
 * processor, which anchors it when it starts (set-up never pulls a consumer from under a
 * running processor).
 */
export async function ensureConsumer(
  jsm: JetStreamManager,
  spec: ConsumerSpec,
  from: CheckpointPosition,
): Promise<'created' | 'exists'> {
  if ((await consumerInfo(jsm, spec.stream, spec.name)) !== undefined) return 'exists'
  try {
    await jsm.consumers.add(spec.stream, consumerConfig(spec, from))
  } catch (err) {
    // Its processor created it meanwhile.
    if ((await consumerInfo(jsm, spec.stream, spec.name)) === undefined) throw err
    return 'exists'
  }
  return 'created'
}
