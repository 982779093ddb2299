/**
 * One slot (the whole stream, or one partition) consumed while this instance holds its lock:
 * anchors the durable consumer at the checkpoint, consumes it, ends on a gap in the deliveries,
 * and runs the pipeline (pipeline.ts, commit.ts) beside the stream watch (stream-watch.ts).
 */
import type { ConsumerInfo, ConsumerMessages, JsMsg } from '@nats-io/jetstream'
import type { Logger } from '../../infra/logger.ts'
import { primeDeliveryInfo } from '../delivery-info.ts'
import type { Slot } from '../partitions.ts'
import { readCheckpoint, type CheckpointPosition } from '../progress/checkpoints.ts'
import { BatchCommitter } from './commit.ts'
import {
  anchorConsumer,
  consumerConfig,
  consumerSpecOf,
  MessageBuffer,
  type ConsumerSpec,
} from './consumer.ts'
import { isAborted, type RunnerContext, type SlotState } from './context.ts'
import { runPipeline } from './pipeline.ts'
import { watchStream, type StreamSeen } from './stream-watch.ts'
import type { DeliveryFigures } from './types.ts'

/**
 * A slot consumed until stopped, given up or broken: takes batches, applies and acks them. Ends
 * by throwing on a failure; the next session starts again from the checkpoint in Postgres.
 */
export class SlotSession {
  readonly #slot: Slot
  readonly #ctx: RunnerContext
  readonly #log: Logger
  readonly #consumer: ConsumerSpec
  /** Aborted by the instance's stop, or when this slot is handed to another instance. */
  readonly #stop = new AbortController()
  readonly #buffer = new MessageBuffer()
  readonly #state: SlotState
  /** Batches and stream checks take turns: a check may move the checkpoint back. */
  #turn: Promise<unknown> = Promise.resolve()
  readonly #stopping: AbortSignal
  /** The newest delivery {@link deliveries} last saw, and when it first saw it. */
  #looked = { delivery: 0, at: 0 }

  constructor(slot: Slot, ctx: RunnerContext, stopping: AbortSignal) {
    this.#slot = slot
    this.#ctx = ctx
    this.#log =
      slot.partition === undefined ? ctx.log : ctx.log.child({ partition: slot.partition })
    this.#consumer = consumerSpecOf(slot, ctx.deps.config)
    this.#stopping = stopping
    this.#state = {
      slot,
      ctx,
      log: this.#log,
      consumer: this.#consumer,
      buffer: this.#buffer,
      stop: this.#stop.signal,
      position: { lastSeq: 0, hlc: null } satisfies CheckpointPosition,
      delivered: 0,
      newest: undefined,
      ackedDelivery: 0,
      diverged: undefined,
      exclusive: (fn) => this.#exclusive(fn),
    }
  }

  /** Finish the batch in hand, then end (the slot now belongs to another instance). */
  giveUp(): void {
    if (this.#stop.signal.aborted) return
    this.#log.info({ slot: this.#slot.key }, 'handing the slot over to another instance')
    this.#stop.abort()
  }

  /** End as soon as possible: the locks are gone or the instance is stopping. */
  interrupt(): void {
    this.#stop.abort()
    this.#buffer.close()
  }

  async run(): Promise<void> {
    const signal = this.#stop.signal
    const buffer = this.#buffer
    const state = this.#state
    const watching = new AbortController()
    const stop = () => {
      this.#stop.abort()
    }
    if (this.#stopping.aborted) stop()
    this.#stopping.addEventListener('abort', stop, { once: true })
    let messages: ConsumerMessages | undefined
    try {
      // What the stream check compares with later, taken before this session's first check
      // (reconnects counted before the look-up: one during it makes the check look again).
      const reconnects = this.#ctx.reconnects()
      const [stream, position] = await Promise.all([
        this.#ctx.deps.jsm.streams.info(this.#consumer.stream),
        readCheckpoint(this.#ctx.deps.db, this.#slot.key),
      ])
      const seen: StreamSeen = { leader: stream.cluster?.leader, reconnects }
      state.position = position
      this.#ctx.counters.checkpointAt(this.#slot.key, position.lastSeq)
      const anchored = await anchorConsumer(this.#ctx.deps.jsm, this.#consumer, position)
      this.#log.info(
        { slot: this.#slot.key, checkpoint: position.lastSeq, consumer: anchored },
        'processor running',
      )

      // With AckPolicy.All, one ack covers every earlier delivery. If the server counted deliveries
      // that never arrived (a connection dropped, a consumer leader died mid-flight), the next
      // ack would cover them too and they would never come again. The consumer sequence numbers
      // every delivery without gaps, so a jump in it is exactly such a loss.
      const deliveries = new DeliverySequence()
      const gap: { skipped?: string } = {}
      // Handed over (or stopped) while anchoring: no pull request left behind at the server for
      // the next owner's deliveries to be counted against.
      if (isAborted(signal)) return
      // From what is known, without a consumer info request: on nats-server 2.9 the JetStream API
      // answers one request at a time, and the info of a filtered consumer (num_pending) costs
      // ~55 ms of its CPU on a 200k-event stream, so every one queues all the others.
      const consumer = this.#ctx.js.consumers.getConsumerFromInfo(
        pullConsumerInfo(this.#consumer, position),
      )
      messages = await consumer.consume({
        max_messages: Math.min(
          this.#ctx.deps.config.processor.batchSize * 2,
          this.#consumer.maxAckPending,
        ),
        // Stop when the consumer disappears, so the session re-anchors it from the checkpoint.
        abort_on_missing_resource: true,
        callback: (m: JsMsg) => {
          primeDeliveryInfo(m)
          state.delivered = Math.max(state.delivered, m.info.streamSequence)
          // Before this session's first ack, what came before its first delivery counts as acked:
          // the consumer was anchored with nothing in flight (or recreated).
          if (state.newest === undefined) state.ackedDelivery = m.info.deliverySequence - 1
          state.newest = m
          if (gap.skipped === undefined && deliveries.add(m.info.deliverySequence)) buffer.push(m)
          else if (gap.skipped === undefined) {
            gap.skipped = `${deliveries.last} to ${m.info.deliverySequence}`
            buffer.close() // what came before the gap is applied; nothing after it
          }
        },
      })
      const closed = messages.closed().then((err) => {
        buffer.close()
        return err
      })

      void watchStream(state, seen, watching.signal)
      const committer = new BatchCommitter(state)
      await runPipeline(
        state,
        async (prepared, from, s) => {
          const pos = await committer.commitBatch(prepared, from, s)
          // Acked by then: its ack covers every delivery before it (AckPolicy.All).
          const acked = prepared.newest?.info.deliverySequence ?? 0
          state.ackedDelivery = Math.max(state.ackedDelivery, acked)
          return pos
        },
        async () => {
          if (gap.skipped !== undefined) {
            throw new Error(
              `deliveries went missing in flight (consumer sequence jumped from ${gap.skipped}): ` +
                'acking past them would skip events; re-anchoring at the checkpoint',
            )
          }
          if (buffer.closed && !isAborted(signal)) {
            const err = await closed
            throw new Error('consumer stopped', { cause: err ?? undefined })
          }
        },
        signal,
      )
    } finally {
      watching.abort()
      this.#stopping.removeEventListener('abort', stop)
      messages?.stop()
    }
  }

  /**
   * The consumer's counts as of the newest delivery (see {@link DeliveryFigures}), if a look at
   * most `freshMs` before `now` found it new. Timed by these looks, not per delivery: the hot
   * path only keeps the newest message.
   */
  deliveries(now: number, freshMs: number): DeliveryFigures | undefined {
    const newest = this.#state.newest
    if (newest === undefined) return undefined
    const info = newest.info
    if (info.deliverySequence !== this.#looked.delivery) {
      this.#looked = { delivery: info.deliverySequence, at: now }
    }
    if (now - this.#looked.at > freshMs) return undefined
    return {
      pending: info.pending,
      ackPending: Math.max(0, info.deliverySequence - this.#state.ackedDelivery),
      deliveredSeq: this.#state.delivered,
    }
  }

  /** Runs `fn` when the batch or check before it has finished. */
  #exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const turn = this.#turn.then(fn)
    this.#turn = turn.catch(() => undefined)
    return turn
  }
}

/**
 * What `consumers.getConsumerFromInfo` reads of a durable pull consumer's info (its name, its
 * stream, and no push `deliver_subject`), for the consumer {@link anchorConsumer} just anchored.
 */
function pullConsumerInfo(spec: ConsumerSpec, from: CheckpointPosition): ConsumerInfo {
  return {
    name: spec.name,
    stream_name: spec.stream,
    config: consumerConfig(spec, from),
  } as ConsumerInfo // the counts and timestamps of a real info are never read from it
}

/** Tracks a consumer's delivery sequence; `add` is false when deliveries were skipped. */
class DeliverySequence {
  last = 0

  add(seq: number): boolean {
    // A new consumer leader may resume below what it delivered before: those are redeliveries.
    if (this.last !== 0 && seq > this.last + 1) return false
    this.last = seq
    return true
  }
}
