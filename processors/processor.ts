import {
  jetstream,
  type ConsumerMessages,
  type JetStreamClient,
  type JetStreamManager,
  type JsMsg,
} from '@nats-io/jetstream'
import type { NatsConnection } from '@nats-io/transport-node'
import { context, trace } from '@opentelemetry/api'
import { BrokenCircuitError, ExponentialBackoff, type IBackoff } from 'cockatiel'
import { sql, type Kysely, type Transaction } from 'kysely'
import type pg from 'pg'
import type { Config } from '../infra/config.ts'
import type { Logger } from '../infra/logger.ts'
import {
  createBreaker,
  isDataError,
  isJetStreamUnavailable,
  isTransient,
  type Breaker,
  type BreakerState,
} from '../infra/failures.ts'
import { errorSummary } from '../infra/retry.ts'
import { dlqStreamSpec } from '../infra/streams.ts'
import { traceFields } from '../infra/telemetry.ts'
import { sleep, Wakeup } from '../infra/sleep.ts'
import {
  advanceCheckpoint,
  CheckpointConflictError,
  readCheckpoint,
  type CheckpointPosition,
} from './progress/checkpoints.ts'
import type { AnyProjection, ProjectedEvent } from '../projections/projection.ts'
import type { Database } from '../projections/tables.ts'
import type { RejectReason } from '../schemas/decode.ts'
import type { EventKind } from '../schemas/events.ts'
import { Headers } from '../schemas/subjects.ts'
import { anchorConsumer, MessageBuffer, type ConsumerSpec } from './runner/consumer.ts'
import { decide } from './decision.ts'
import { Lease, REBALANCE_MS, slotsOf, type Slot } from './partitions.ts'
import { fencedDatabase } from './progress/slot-fence.ts'
import { parkInDlq } from './dlq/park.ts'
import {
  findDivergence,
  markOf,
  pruneMarks,
  rewindCheckpoint,
  sweepMarks,
  sweepStart,
  type Divergence,
  type MarksToCompare,
} from './progress/stream-marks.ts'
import { BatchSpans } from './tracing.ts'
import type { Metrics, ProcessorMetrics } from './metrics.ts'

/**
 * A processor: one durable consumer on FLEET_EVENTS feeding one projection.
 *
 * ```ts
 * export const readingsProcessor: ProcessorSpec = {
 *   name: 'readings', reads: 'reading', projection: readingsProjection,
 * }
 * ```
 */
export interface ProcessorSpec {
  /** Durable consumer name and checkpoint key (with `-p<N>` per partition), DLQ subject token. */
  readonly name: string
  /**
   * The events it reads: one kind, or all. Its consumers read the whole stream (or partition,
   * {@link slotsOf}) so that redrives reach them; `decide()` skips the other kinds.
   */
  readonly reads: EventKind | 'all'
  readonly projection: AnyProjection
  /** Runs beside the processor while it runs (e.g. the alerts' outbox relay). */
  readonly companion?: (deps: ProcessorDeps, signal: AbortSignal) => Promise<void>
}

export interface ProcessorDeps {
  readonly nc: NatsConnection
  readonly jsm: JetStreamManager
  readonly db: Kysely<Database>
  /** The pool `db` runs on: each instance's lock session and its slots' transactions come from it. */
  readonly pool: pg.Pool
  readonly config: Config
  readonly log: Logger
  /** Where the processor reports what it does (Prometheus); nothing is reported without it. */
  readonly metrics?: Metrics
}

export interface ProcessorStats {
  /** Messages taken off the consumer, redeliveries included. */
  received: number
  /** Events committed to the read model (idempotent re-applies included). */
  applied: number
  /** Events parked in FLEET_DLQ. */
  rejected: number
  /** Redeliveries of events at or below the checkpoint, acked without work. */
  skipped: number
  batches: number
  /**
   * The newest stream sequence committed (the checkpoint of a processor that is not
   * partitioned; the highest of the partitions' checkpoints this instance owns otherwise).
   */
  checkpoint: number
  /** The checkpoint of each slot this instance owns now (see {@link slotsOf}). */
  slots: Record<string, number>
  /** Transactions that failed and were retried. */
  retries: number
  /** Events parked because the projection failed on them every time (a subset of `rejected`). */
  poisoned: number
  state: 'starting' | 'standby' | 'running' | 'backing-off' | 'stopped'
  /** The Postgres circuit breaker: open means the processor has stopped fetching. */
  postgres: BreakerState
}

export interface RunningProcessor {
  readonly name: string
  readonly stats: Readonly<ProcessorStats>
  /** Finish the batch in hand (or abandon it uncommitted if the database is down), then stop. */
  stop(): Promise<void>
  /** Settles when the processor has stopped. */
  readonly done: Promise<void>
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

/**
 * Runs a processor until stopped. Never assumes NATS or Postgres is up: every failure is logged
 * and retried with exponential backoff and jitter, and each session starts again from the
 * checkpoint in Postgres.
 */
export function startProcessor(spec: ProcessorSpec, deps: ProcessorDeps): RunningProcessor {
  return new ProcessorRunner(spec, deps)
}

class ProcessorRunner implements RunningProcessor {
  readonly name: string
  readonly stats: ProcessorStats = {
    received: 0,
    applied: 0,
    rejected: 0,
    skipped: 0,
    batches: 0,
    checkpoint: 0,
    slots: {},
    retries: 0,
    poisoned: 0,
    state: 'starting',
    postgres: 'closed',
  }
  readonly done: Promise<void>
  readonly #spec: ProcessorSpec
  readonly #deps: ProcessorDeps
  readonly #log: Logger
  readonly #js: JetStreamClient
  readonly #stopping = new AbortController()
  readonly #slots: readonly Slot[]
  readonly #postgres: Breaker
  readonly #metrics: ProcessorMetrics | undefined
  /** Events parked for handler failures since the last successful commit of any event. */
  #consecutivePoison = 0
  /** Times the NATS connection came back: the stream may have changed meanwhile. */
  #reconnects = 0

  constructor(spec: ProcessorSpec, deps: ProcessorDeps) {
    this.name = spec.name
    this.#spec = spec
    this.#deps = deps
    this.#log = deps.log.child({ processor: spec.name })
    this.#js = jetstream(deps.nc)
    this.#slots = slotsOf(spec, deps.config)
    this.#postgres = createBreaker('postgres', this.#log)
    this.#metrics = deps.metrics?.register(this)
    this.#postgres.policy.onStateChange(() => {
      this.stats.postgres = this.#postgres.state
    })
    const companion = spec.companion?.(deps, this.#stopping.signal).catch((err: unknown) => {
      this.#log.error({ err: errorSummary(err) }, `${spec.name} companion stopped`)
    })
    void this.#countReconnects()
    this.done = Promise.all([this.#supervise(), companion]).then(() => undefined)
  }

  async #countReconnects(): Promise<void> {
    for await (const s of this.#deps.nc.status()) if (s.type === 'reconnect') this.#reconnects++
  }

  async stop(): Promise<void> {
    this.#stopping.abort()
    await this.done
  }

  async #supervise(): Promise<void> {
    const signal = this.#stopping.signal
    const backoff = new ExponentialBackoff({ initialDelay: 250, maxDelay: 15_000 }).next()
    let delay = backoff
    while (!signal.aborted) {
      try {
        await this.#membership(signal, () => (delay = backoff))
      } catch (err) {
        if (isAborted(signal)) break
        this.stats.state = 'backing-off'
        this.#log.warn(
          { err: errorSummary(err), retryInMs: Math.round(delay.duration) },
          'processor session failed',
        )
        await sleep(delay.duration, signal)
        delay = delay.next(undefined)
      }
    }
    this.stats.state = 'stopped'
    this.#log.info({ checkpoint: this.stats.checkpoint }, 'processor stopped')
  }

  /**
   * One membership among the processor's instances: a Postgres session holds this instance's
   * locks (see {@link Lease}); slots are taken and given back as instances come and go, each
   * consumed by its own {@link SlotSession}. Ends (and every slot session with it) when that
   * Postgres session breaks.
   */
  async #membership(signal: AbortSignal, healthy: () => void): Promise<void> {
    // While the breaker is open this fails at once; after its backoff it lets one probe through.
    await this.#postgres.policy.execute(() => this.#deps.pool.query('select 1'))
    const owned = new Map<Slot, OwnedSlot>()
    const wake = new Wakeup()
    const lease = await Lease.open(this.#deps.pool, this.name, (err) => {
      // Frozen, cut off, or the connection broke: another instance may own these slots already.
      // Their transactions cannot commit any more (processors/slot-fence.ts); end them now.
      this.#log.warn(
        { err: errorSummary(err), slots: [...owned.keys()].map((s) => s.key) },
        "lost the Postgres session that holds this instance's slots; giving them up",
      )
      for (const o of owned.values()) o.session.interrupt()
      this.stats.state = 'backing-off' // not ready, even while a session cut off still winds down
      wake.notify()
    })
    const backoffs = new Map<Slot, { until: number; delay: IBackoff<unknown> }>()
    try {
      while (!(await lease.join())) {
        this.stats.state = 'standby'
        await sleep(REBALANCE_MS, signal)
        if (signal.aborted) return
      }
      while (!signal.aborted) {
        if (lease.lost) {
          throw new Error('lost the connection holding the processor locks', { cause: lease.lost })
        }
        const wanted = await lease.share(this.#slots)
        for (const slot of this.#slots) {
          const mine = owned.get(slot)
          if (mine !== undefined) {
            if (!wanted.has(slot)) mine.session.giveUp() // another instance's share now
            continue
          }
          if (!wanted.has(slot) || (backoffs.get(slot)?.until ?? 0) > Date.now()) continue
          if (!(await lease.tryAcquire(slot.key))) continue // its owner has not let go yet
          const db = fencedDatabase(this.#deps.pool, lease, slot.key)
          const session = new SlotSession(slot, this.#context(db), signal)
          const startedAt = Date.now()
          const entry: OwnedSlot = { session, ended: Promise.resolve() }
          entry.ended = session
            .run()
            .then(
              () => {
                backoffs.delete(slot)
              },
              (err: unknown) => {
                if (signal.aborted) return
                // A session that had been going for a while starts its backoff afresh; one that
                // fails again soon after starting waits longer each time.
                const lasted = Date.now() - startedAt > SLOT_HEALTHY_MS
                const previous = lasted ? undefined : backoffs.get(slot)?.delay
                const delay = previous?.next(undefined) ?? SLOT_BACKOFF.next()
                backoffs.set(slot, { until: Date.now() + delay.duration, delay })
                this.#log.warn(
                  {
                    slot: slot.key,
                    err: errorSummary(err),
                    retryInMs: Math.round(delay.duration),
                  },
                  'processor session failed',
                )
              },
            )
            .finally(async () => {
              // The slot is given back before the session counts as ended, so the lease is
              // never closed (and its connection returned to the pool) under a release.
              owned.delete(slot)
              this.stats.slots = Object.fromEntries(
                Object.entries(this.stats.slots).filter(([key]) => key !== slot.key),
              )
              await lease.release(slot.key).catch(() => undefined)
              wake.notify()
            })
          owned.set(slot, entry)
        }
        const waiting = [...backoffs.values()].some((b) => b.until > Date.now())
        const state = owned.size > 0 ? 'running' : waiting ? 'backing-off' : 'standby'
        if (state === 'standby' && this.stats.state !== 'standby') {
          this.#log.info('other instances own every slot of this processor; standing by')
        }
        this.stats.state = state
        if (state === 'running') healthy()
        const soonest = Math.min(
          ...[...backoffs.values()].map((b) => b.until).filter((t) => t > Date.now()),
        )
        await wake.wait(Math.max(10, Math.min(REBALANCE_MS, soonest - Date.now())), signal)
      }
    } finally {
      const ending = [...owned.values()]
      for (const o of ending) o.session.interrupt()
      await Promise.all(ending.map((o) => o.ended))
      await lease.close()
    }
  }

  /** What every slot session of this instance shares; `db` is the slot's, fenced by its lease. */
  #context(db: Kysely<Database>): RunnerContext {
    return {
      spec: this.#spec,
      deps: { ...this.#deps, db },
      log: this.#log,
      js: this.#js,
      postgres: this.#postgres,
      metrics: this.#metrics,
      stats: this.stats,
      reconnects: () => this.#reconnects,
      poison: {
        get: () => this.#consecutivePoison,
        set: (n) => {
          this.#consecutivePoison = n
        },
      },
    }
  }
}

/** What the slot sessions of one processor instance share. */
interface RunnerContext {
  readonly spec: ProcessorSpec
  readonly deps: ProcessorDeps
  readonly log: Logger
  readonly js: JetStreamClient
  readonly postgres: Breaker
  readonly metrics: ProcessorMetrics | undefined
  readonly stats: ProcessorStats
  /** Events parked for handler failures since the last successful commit of any event. */
  readonly poison: { get(): number; set(n: number): void }
  /** How often the NATS connection has come back so far. */
  readonly reconnects: () => number
}

/** What a slot session's stream check compares with: the stream leader and reconnects seen last. */
interface StreamSeen {
  readonly leader: string | undefined
  readonly reconnects: number
}

interface OwnedSlot {
  readonly session: SlotSession
  /** Settles when the session has ended (its failure already handled). */
  ended: Promise<void>
}

/**
 * One slot (the whole stream, or one partition) consumed while this instance holds its lock:
 * anchor the durable consumer at the checkpoint, then take batches, apply and ack them until
 * stopped, given up or broken. Ends by throwing on a failure; the next session starts again
 * from the checkpoint in Postgres.
 */
class SlotSession {
  readonly #slot: Slot
  readonly #ctx: RunnerContext
  readonly #log: Logger
  readonly #consumer: ConsumerSpec
  /** Aborted by the instance's stop, or when this slot is handed to another instance. */
  readonly #stop = new AbortController()
  readonly #buffer = new MessageBuffer()
  /** Spans of the batch in hand (one batch at a time). */
  #spans: BatchSpans | undefined
  /** The checkpoint as this session last committed (or rewound) it. */
  #position: CheckpointPosition = { lastSeq: 0, hlc: null }
  /** The new messages of the batch in hand, in stream order: each commit marks its range of them. */
  #inHand: readonly JsMsg[] = []
  /** The highest stream sequence delivered in this session. */
  #delivered = 0
  /** Batches and stream checks take turns: a check may move the checkpoint back. */
  #turn: Promise<unknown> = Promise.resolve()
  /** Set when the stream no longer holds what was applied: the session ends and re-anchors. */
  #diverged: Error | undefined

  readonly #stopping: AbortSignal

  constructor(slot: Slot, ctx: RunnerContext, stopping: AbortSignal) {
    this.#slot = slot
    this.#ctx = ctx
    this.#log =
      slot.partition === undefined ? ctx.log : ctx.log.child({ partition: slot.partition })
    this.#consumer = consumerSpecOf(slot, ctx.deps.config)
    this.#stopping = stopping
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
    const watching = new AbortController()
    const stop = () => {
      this.#stop.abort()
    }
    if (this.#stopping.aborted) stop()
    this.#stopping.addEventListener('abort', stop, { once: true })
    let messages: ConsumerMessages | undefined
    try {
      // What the stream check compares with later, taken before this session's first check.
      const seen: StreamSeen = {
        leader: (await this.#ctx.deps.jsm.streams.info(this.#consumer.stream)).cluster?.leader,
        reconnects: this.#ctx.reconnects(),
      }
      const position = await readCheckpoint(this.#ctx.deps.db, this.#slot.key)
      this.#position = position
      this.#checkpointAt(position.lastSeq)
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
      const consumer = await this.#ctx.js.consumers.get(this.#consumer.stream, this.#consumer.name)
      messages = await consumer.consume({
        max_messages: Math.min(
          this.#ctx.deps.config.processor.batchSize * 2,
          this.#consumer.maxAckPending,
        ),
        // Stop when the consumer disappears, so the session re-anchors it from the checkpoint.
        abort_on_missing_resource: true,
        callback: (m) => {
          this.#delivered = Math.max(this.#delivered, m.info.streamSequence)
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

      void this.#watchStream(seen, watching.signal)
      // Two stages overlap: while batch k commits, batch k+1 is taken and decided. Commits run
      // one at a time in stream order, and each acks its batch only once committed, so the
      // checkpoint is a low-watermark: no sequence is recorded while a lower one is uncommitted.
      // A failed commit ends the session before the batch prepared behind it is committed or
      // acked; the next session starts again from the checkpoint in Postgres.
      let committing: Promise<void> | undefined
      /** The checkpoint the batch in flight will leave: what the next batch is prepared against. */
      let preparedTo = this.#position.lastSeq
      const { batchSize, batchLingerMs } = this.#ctx.deps.config.processor
      while (!isAborted(signal)) {
        const batch = await buffer.take(batchSize, batchLingerMs, signal)
        if (this.#diverged !== undefined) throw this.#diverged
        if (batch.length === 0) {
          await committing // what came before is committed (or its failure ends the session)
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
          continue
        }
        const prepared = this.#prepare(batch, preparedTo)
        preparedTo = Math.max(preparedTo, prepared.lastSeq)
        await committing
        const commit = this.#exclusive(async () => {
          // A check that ran while this batch waited moved the checkpoint back past it.
          if (this.#diverged !== undefined) throw this.#diverged
          this.#position = await this.#processBatch(prepared, this.#position, signal)
        })
        // Its failure is thrown where it is awaited: before the next commit, or at once when the
        // loop is waiting for messages (the buffer closes and the wait ends).
        commit.catch(() => {
          buffer.close()
        })
        committing = commit
      }
      await committing
    } finally {
      watching.abort()
      this.#stopping.removeEventListener('abort', stop)
      messages?.stop()
    }
  }

  /** Runs `fn` when the batch or check before it has finished. */
  #exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const turn = this.#turn.then(fn)
    this.#turn = turn.catch(() => undefined)
    return turn
  }

  #findDivergence(which: MarksToCompare): Promise<Divergence | undefined> {
    const { db, jsm } = this.#ctx.deps
    const { stream, filterSubject } = this.#consumer
    return findDivergence(db, jsm, stream, this.#slot.key, filterSubject, which)
  }

  /**
   * Moves the checkpoint back from `position` to where the stream stopped agreeing with what this
   * slot applied (see processors/stream-marks.ts). Returns the position to go on from.
   */
  async #rewind(
    found: Divergence,
    position: CheckpointPosition,
    why: string,
  ): Promise<CheckpointPosition> {
    // Never forward: a mark past the checkpoint is from before a replay moved it back.
    const toSeq = Math.min(found.mark.fromSeq, position.lastSeq)
    const to = await rewindCheckpoint(this.#ctx.deps.db, this.#slot.key, position, toSeq)
    if (to.lastSeq === position.lastSeq) return position
    this.#log.warn(
      {
        slot: this.#slot.key,
        why,
        range: `${found.mark.fromSeq + 1}-${found.mark.lastSeq}`,
        found: found.found,
        checkpoint: position.lastSeq,
        rewoundTo: to.lastSeq,
      },
      'the stream no longer holds what was applied at this sequence; reading again from before it',
    )
    this.#ctx.metrics?.rewound()
    return to
  }

  /**
   * While the session runs: first the commits just before it (the stream may have changed while
   * the slot was away), then after a new stream leader, a reconnect, the stream ending below what
   * was delivered, or a commit's last message disagreeing, compares the stream with the marks; if
   * the checkpoint has to go back, it does so between two batches and the session ends, so the
   * next one anchors there. Batches go on meanwhile: reading back a busy slot's last seconds can
   * take as long, and projections apply what is read again idempotently.
   */
  async #watchStream(seen: StreamSeen, signal: AbortSignal): Promise<void> {
    const { jsm, db } = this.#ctx.deps
    let { leader, reconnects } = seen
    // The session-start comparison is retried each round until it has run once.
    let startDue: { sessionStart: number } | undefined = { sessionStart: this.#position.lastSeq }
    let due: string | undefined
    // The checkpoint at the last few checks that saw nothing wrong: what a failover can have
    // rewritten was applied after the oldest of them (kept a few checks back, for the tail
    // read just before the change was seen).
    const settled: number[] = [this.#position.lastSeq]
    let swept = await sweepStart(db, this.#slot.key).catch(() => 0)
    for (let round = 1; !isAborted(signal) && this.#diverged === undefined; round++) {
      if (startDue === undefined) await sleep(STREAM_CHECK_MS, signal)
      if (isAborted(signal)) return
      try {
        if (startDue !== undefined) {
          const found = await this.#findDivergence(startDue)
          startDue = undefined
          if (found !== undefined) await this.#rewindBeside(found, 'session start', signal)
          continue
        }
        const info = await jsm.streams.info(this.#consumer.stream)
        const now = info.cluster?.leader
        if (now !== leader) due ??= `new stream leader ${now ?? '(none)'}`
        if (info.state.last_seq < this.#delivered)
          due ??= 'the stream ends below what was delivered'
        if (this.#ctx.reconnects() !== reconnects) due ??= 'reconnected to NATS'
        leader = now
        reconnects = this.#ctx.reconnects()
        const sweep = await sweepMarks(db, jsm, this.#consumer.stream, this.#slot.key, swept)
        let afterSeq = settled[0] ?? 0
        if (sweep.disagreesAt !== undefined) {
          due ??= 'a commit no longer agrees with the stream'
          afterSeq = Math.min(afterSeq, sweep.sweptTo)
        }
        if (due !== undefined) {
          const why = due
          // Compared while batches go on: only moving the checkpoint waits for the batch in hand.
          const found = await this.#findDivergence({ afterSeq })
          if (found !== undefined) await this.#rewindBeside(found, why, signal)
          due = undefined
        }
        // Past a disagreement once the full check has run (it went back, or there was nothing
        // to go back for: a message aged out of the stream).
        swept = sweep.disagreesAt ?? sweep.sweptTo
        settled.push(this.#position.lastSeq)
        if (settled.length > SETTLED_CHECKS) settled.shift()
        if (round % PRUNE_EVERY_ROUNDS === 0) await pruneMarks(db, this.#slot.key)
      } catch (err) {
        if (err instanceof CheckpointConflictError) {
          this.#diverged = err
          this.#buffer.close()
          return
        }
        // NATS or Postgres not answering: try again next round, the check still due.
        this.#log.debug({ err: errorSummary(err) }, 'stream check failed; trying again')
        if (startDue !== undefined) await sleep(STREAM_CHECK_MS, signal)
      }
    }
  }

  /**
   * Moves the checkpoint back to before `found`, between two batches, and ends the session so
   * the next one anchors there.
   */
  async #rewindBeside(found: Divergence, why: string, signal: AbortSignal): Promise<void> {
    await this.#exclusive(async () => {
      if (this.#diverged !== undefined || isAborted(signal)) return
      const from = this.#position
      const to = await this.#rewind(found, from, why)
      if (to.lastSeq === from.lastSeq) return
      this.#position = to
      this.#checkpointAt(to.lastSeq)
      this.#diverged = new Error(
        `the stream changed under the checkpoint (${why}); re-anchoring at ${to.lastSeq}`,
      )
      this.#buffer.close()
    })
  }

  #checkpointAt(seq: number): void {
    const stats = this.#ctx.stats
    stats.slots[this.#slot.key] = seq
    stats.checkpoint = Math.max(0, ...Object.values(stats.slots))
  }

  /**
   * The first stage, while the batch before it commits: drops what is at or below `from` (the
   * checkpoint the batch in flight leaves) or repeated, and decides the rest in stream order.
   * Pure CPU: nothing is parked, written or acked here.
   */
  #prepare(batch: JsMsg[], from: number): Prepared {
    const stats = this.#ctx.stats
    const metrics = this.#ctx.metrics
    stats.received += batch.length
    const spans = new BatchSpans(this.#slot.processor, this.#slot.filterSubject, batch)
    const fresh: JsMsg[] = []
    const seen = new Set<number>()
    let newest: JsMsg | undefined
    for (const m of batch) {
      const seq = m.info.streamSequence
      if (newest === undefined || seq > newest.info.streamSequence) newest = m
      if (seq <= from || seen.has(seq)) {
        stats.skipped++
        metrics?.skipped()
        continue
      }
      seen.add(seq)
      fresh.push(m)
    }
    fresh.sort((a, b) => a.info.streamSequence - b.info.streamSequence)
    const accepted: Accepted[] = []
    const refused: Refused[] = []
    for (const msg of fresh) {
      const d = decide(msg, this.#ctx.spec, this.#ctx.deps.config)
      if (d.kind === 'skip') {
        // Put back from the DLQ for another processor (this one applied the original), or of a
        // kind this processor does not read.
        stats.skipped++
        metrics?.skipped()
        continue
      }
      spans.event(
        msg,
        d.kind === 'apply'
          ? { correlationId: d.event.event.correlationId, hlc: d.event.event.hlc }
          : undefined,
      )
      if (d.kind === 'refuse') refused.push({ msg, reason: d.reason, detail: d.detail })
      else accepted.push({ msg, event: d.event })
    }
    const lastSeq = fresh[fresh.length - 1]?.info.streamSequence ?? from
    return { size: batch.length, newest, fresh, accepted, refused, spans, lastSeq }
  }

  /**
   * The second stage, one batch at a time in stream order: parks what was refused; applies the
   * rest with the checkpoint, splitting the batch to isolate an event the projection fails on
   * every time; terminates what was parked; acks the batch. Returns the new checkpoint. A
   * transient failure (or too much poison at once) ends the session with nothing of the
   * uncommitted part applied or acked; the next session resumes at the checkpoint.
   */
  async #processBatch(
    prepared: Prepared,
    from: CheckpointPosition,
    signal: AbortSignal,
  ): Promise<CheckpointPosition> {
    const spans = prepared.spans
    this.#spans = spans
    try {
      // The transaction runs inside the batch span: its database spans land beneath it.
      const pos = await context.with(trace.setSpan(context.active(), spans.batch), () =>
        this.#applyBatch(prepared, from, signal),
      )
      spans.committed(pos.lastSeq)
      return pos
    } catch (err) {
      spans.failed(err)
      throw err
    } finally {
      this.#spans = undefined
    }
  }

  async #applyBatch(
    prepared: Prepared,
    from: CheckpointPosition,
    signal: AbortSignal,
  ): Promise<CheckpointPosition> {
    const started = performance.now()
    const { newest, fresh, accepted } = prepared
    if (newest === undefined) return from
    if (fresh.length === 0) {
      newest.ack()
      return from
    }
    this.#inHand = fresh
    const parked: JsMsg[] = []
    for (const r of prepared.refused) {
      // Refused as it is: no attempt can change that. Parked before any commit passes it.
      await this.#park({ ...r, attempts: 1 })
      parked.push(r.msg)
    }

    let pos = await this.#applyIsolating(accepted, from, parked, signal)
    const lastSeq = fresh[fresh.length - 1]?.info.streamSequence ?? pos.lastSeq
    if (pos.lastSeq < lastSeq) pos = await this.#commit([], pos, { lastSeq, hlc: pos.hlc }, signal)

    for (const m of parked) m.term() // no reason: nats-server 2.9 would redeliver term(reason)
    newest.ack()
    this.#ctx.stats.batches++
    this.#checkpointAt(pos.lastSeq)
    this.#ctx.metrics?.batch(prepared.size, (performance.now() - started) / 1000)
    return pos
  }

  /**
   * Commits `events` (in stream order) with the checkpoint. When Postgres refuses the values of
   * some of them (a data error, {@link isDataError}), those are found in one pass with a savepoint
   * per event, parked at once as `storage-refused` and the rest committed: the events' fault, so
   * they never count toward {@link MAX_CONSECUTIVE_POISON}. When the projection fails on them
   * otherwise, each half is tried on its own, down to the one event that fails; that one gets
   * {@link POISON_ATTEMPTS} attempts, then is parked, and the rest goes on.
   */
  async #applyIsolating(
    events: readonly Accepted[],
    from: CheckpointPosition,
    parked: JsMsg[],
    signal: AbortSignal,
  ): Promise<CheckpointPosition> {
    const last = events[events.length - 1]
    if (last === undefined) return from
    let hlc = from.hlc
    for (const e of events) if (hlc === null || e.event.event.hlc > hlc) hlc = e.event.event.hlc
    const to: CheckpointPosition = { lastSeq: last.event.streamSeq, hlc }
    try {
      return await this.#commit(
        events.map((e) => e.event),
        from,
        to,
        signal,
      )
    } catch (err) {
      if (!(err instanceof DeterministicFailure)) throw err
      if (isDataError(err.cause)) {
        const refusing = await this.#applyRefusing(events, from, to, parked, signal).catch(
          (e: unknown) => {
            // Something other than a data error among them: isolate it by halving.
            if (e instanceof DeterministicFailure) return e
            throw e
          },
        )
        if (!(refusing instanceof DeterministicFailure)) return refusing
      }
      if (events.length > 1) {
        const mid = Math.ceil(events.length / 2)
        const left = await this.#applyIsolating(events.slice(0, mid), from, parked, signal)
        return this.#applyIsolating(events.slice(mid), left, parked, signal)
      }
      const [only] = events as [Accepted]
      let failure = err
      for (let attempt = 2; attempt <= POISON_ATTEMPTS; attempt++) {
        await sleep(100 * attempt, signal)
        try {
          return await this.#commit([only.event], from, to, signal)
        } catch (again) {
          if (!(again instanceof DeterministicFailure)) throw again
          failure = again
        }
      }
      if (this.#ctx.poison.get() >= MAX_CONSECUTIVE_POISON) {
        // Everything fails: a broken projection, not bad events. Stop and back off rather than
        // empty the stream into the DLQ; a fixed deployment (a restart) starts counting afresh.
        throw new Error(
          `${MAX_CONSECUTIVE_POISON} events in a row failed in the projection; treating it as systemic, not poison`,
          { cause: failure.cause },
        )
      }
      this.#ctx.poison.set(this.#ctx.poison.get() + 1)
      await this.#park({
        msg: only.msg,
        reason: 'handler-failed',
        detail: errorSummary(failure.cause),
        attempts: POISON_ATTEMPTS,
      })
      parked.push(only.msg)
      this.#ctx.stats.poisoned++
      return from
    }
  }

  /**
   * Applies `events` one by one under savepoints in one transaction: those Postgres refuses are
   * rolled back to their savepoint and the rest applied in order, as one set-based apply would. If
   * any were refused, the transaction is rolled back, they are parked (before any commit passes
   * them) and the rest is applied again, so one pass over a batch finds every culprit however many
   * there are (halving would cost a transaction per culprit and level).
   */
  async #applyRefusing(
    events: readonly Accepted[],
    from: CheckpointPosition,
    to: CheckpointPosition,
    parked: JsMsg[],
    signal: AbortSignal,
  ): Promise<CheckpointPosition> {
    let rest = events
    for (;;) {
      try {
        return await this.#commit(
          rest.map((e) => e.event),
          from,
          to,
          signal,
          true,
        )
      } catch (err) {
        if (!(err instanceof StorageRefused)) throw err
        const refused = new Set(err.refused.map((r) => r.seq))
        for (const r of err.refused) {
          const e = rest.find((a) => a.event.streamSeq === r.seq) as Accepted
          await this.#park({
            msg: e.msg,
            reason: 'storage-refused',
            detail: errorSummary(r.cause),
            attempts: 1,
          })
          parked.push(e.msg)
        }
        rest = rest.filter((e) => !refused.has(e.event.streamSeq))
      }
    }
  }

  /**
   * Parks one event in the DLQ, and says so once the DLQ has acknowledged it. A failed park is
   * retried with backoff; when the server refuses the entry itself (not merely unavailable), a
   * stub without the original headers and body, naming the original's stream sequence, is parked
   * instead. After {@link PARK_ATTEMPTS} the session ends with nothing of the batch acked, and
   * the next one parks it again (once: the DLQ deduplicates).
   */
  async #park(d: {
    msg: JsMsg
    reason: RejectReason
    detail: string
    attempts: number
  }): Promise<void> {
    this.#spans?.parked(d.msg, d.reason, d.detail)
    const fields = {
      ...traceFields(this.#spans?.spanOf(d.msg)),
      correlationId: d.msg.headers?.get(Headers.CorrelationId) || undefined,
      seq: d.msg.info.streamSequence,
      subject: d.msg.subject,
      reason: d.reason,
      detail: d.detail,
      attempts: d.attempts,
    }
    const { config, nc } = this.#ctx.deps
    const limits = {
      maxEntryBytes: Math.min(
        dlqStreamSpec(config.streams).max_msg_size,
        nc.info?.max_payload ?? Number.POSITIVE_INFINITY,
      ),
    }
    const signal = this.#stop.signal
    let stub = false
    let delay = new ExponentialBackoff({ initialDelay: 200, maxDelay: 5_000 }).next()
    for (let attempt = 1; ; attempt++) {
      try {
        const parked = await parkInDlq(
          this.#ctx.js,
          { processor: this.#slot.processor, ...d },
          limits,
          { stub },
        )
        this.#log.warn(
          {
            ...fields,
            dlqSeq: parked.seq,
            ...(parked.duplicate ? { duplicate: true } : {}),
            ...(parked.cut.length > 0 ? { cut: parked.cut } : {}),
            ...(stub ? { stub } : {}),
          },
          'event parked in the DLQ',
        )
        break
      } catch (err) {
        const refused = !isJetStreamUnavailable(err) && !isTransient(err)
        if (attempt >= PARK_ATTEMPTS || isAborted(signal)) {
          this.#log.error(
            { ...fields, err: errorSummary(err), attempt },
            'could not park the event in the DLQ; the session ends and the event is tried again',
          )
          throw new Error(
            `could not park stream sequence ${d.msg.info.streamSequence} in the DLQ after ${attempt} attempts`,
            { cause: err },
          )
        }
        this.#log.warn(
          { ...fields, err: errorSummary(err), attempt, retryInMs: Math.round(delay.duration) },
          refused && !stub
            ? 'the DLQ refused the entry; parking a stub that points at the original instead'
            : 'parking in the DLQ failed; retrying',
        )
        if (refused) stub = true
        await sleep(delay.duration, signal)
        delay = delay.next(undefined)
      }
    }
    this.#ctx.stats.rejected++
    this.#ctx.metrics?.parked(d.reason)
  }

  /**
   * One transaction: the events and the checkpoint move from `from` to `to`, through the
   * Postgres breaker. Rides out a blip in place; a deterministic failure is returned to the caller
   * as {@link DeterministicFailure}; a lasting outage ends the session instead of holding the batch
   * (messages held past ack_wait would be redelivered into the buffer again and again).
   */
  async #commit(
    events: readonly ProjectedEvent[],
    from: CheckpointPosition,
    to: CheckpointPosition,
    signal: AbortSignal,
    eachUnderSavepoint = false,
  ): Promise<CheckpointPosition> {
    // Hashed once, not on every attempt.
    const mark = markOf(this.#inHand, from.lastSeq, to.lastSeq)
    let delay = new ExponentialBackoff({ initialDelay: 100, maxDelay: 2_000 }).next()
    for (let attempt = 1; ; attempt++) {
      const started = performance.now()
      try {
        await this.#ctx.postgres.policy.execute(() =>
          this.#ctx.deps.db.transaction().execute(async (trx) => {
            if (eachUnderSavepoint) await this.#applyEach(trx, events)
            else await this.#ctx.spec.projection.apply(trx, events)
            await advanceCheckpoint(trx, this.#slot.key, this.#consumer.stream, from, to, mark)
          }),
        )
        this.#ctx.stats.applied += events.length
        this.#ctx.metrics?.committed(events)
        if (events.length > 0) this.#ctx.poison.set(0)
        this.#log.debug(
          {
            applied: events.length,
            to: to.lastSeq,
            commitMs: Math.round(performance.now() - started),
          },
          'committed',
        )
        return to
      } catch (err) {
        // Someone else moved the checkpoint: end the session, re-read it and re-anchor.
        if (err instanceof CheckpointConflictError || err instanceof StorageRefused) throw err
        if (signal.aborted) throw err
        if (!isTransient(err)) throw new DeterministicFailure(err)
        if (attempt >= COMMIT_ATTEMPTS || err instanceof BrokenCircuitError) {
          throw new Error(`not committed after ${attempt} attempts`, { cause: err })
        }
        this.#ctx.stats.retries++
        this.#ctx.metrics?.retried()
        this.#log.warn(
          { err: errorSummary(err), retryInMs: Math.round(delay.duration) },
          'transaction failed; retrying',
        )
        await sleep(delay.duration, signal)
        if (isAborted(signal))
          throw new Error('stopped before the batch could be committed', { cause: err })
        delay = delay.next(undefined)
      }
    }
  }

  /**
   * Applies each event under its own savepoint; throws {@link StorageRefused} (after trying them
   * all) when Postgres refused the values of some. Any other failure ends the transaction.
   */
  async #applyEach(trx: Transaction<Database>, events: readonly ProjectedEvent[]): Promise<void> {
    const refused: { seq: number; cause: unknown }[] = []
    for (const e of events) {
      await sql`savepoint fleet_event`.execute(trx)
      try {
        await this.#ctx.spec.projection.apply(trx, [e])
      } catch (err) {
        if (!isDataError(err)) throw err
        await sql`rollback to savepoint fleet_event`.execute(trx)
        refused.push({ seq: e.streamSeq, cause: err })
        continue
      }
      await sql`release savepoint fleet_event`.execute(trx)
    }
    if (refused.length > 0) throw new StorageRefused(refused)
  }
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

interface Accepted {
  readonly msg: JsMsg
  readonly event: ProjectedEvent
}

interface Refused {
  readonly msg: JsMsg
  readonly reason: RejectReason
  readonly detail: string
}

/** A batch taken and decided, waiting for the batch before it to commit. */
interface Prepared {
  /** Messages taken, redeliveries included. */
  readonly size: number
  /** The newest delivery: its ack covers the batch (AckPolicy.All). */
  readonly newest: JsMsg | undefined
  /** Messages past the checkpoint, each once, in stream order. */
  readonly fresh: readonly JsMsg[]
  readonly accepted: readonly Accepted[]
  readonly refused: readonly Refused[]
  readonly spans: BatchSpans
  /** The checkpoint once this batch commits. */
  readonly lastSeq: number
}

/** Postgres refused the values of these events (by stream sequence); the rest applied cleanly. */
class StorageRefused extends Error {
  override readonly name = 'StorageRefused'
  constructor(readonly refused: readonly { readonly seq: number; readonly cause: unknown }[]) {
    super(`Postgres refused ${refused.length} event(s): ${errorSummary(refused[0]?.cause)}`)
  }
}

/** The projection failed on this input in a way a retry cannot fix. */
class DeterministicFailure extends Error {
  override readonly name = 'DeterministicFailure'
  constructor(cause: unknown) {
    super(errorSummary(cause), { cause })
  }
}

/** Waits before a slot whose session failed is taken again (by this instance). */
const SLOT_BACKOFF = new ExponentialBackoff({ initialDelay: 250, maxDelay: 15_000 })
/** A slot session that lasted this long before failing starts the backoff afresh. */
const SLOT_HEALTHY_MS = 30_000

/** Attempts to park one event (with backoff, ~10 s in all) before the session ends. */
const PARK_ATTEMPTS = 6
/** Attempts of one isolated event before it is parked. */
const POISON_ATTEMPTS = 3
/**
 * More poison than this in a row, with no event applied in between, is a broken projection. Events
 * whose values Postgres refuses (parked as `storage-refused`) are not counted: they are the events'
 * fault, and a burst of them must not stop the processor.
 */
const MAX_CONSECUTIVE_POISON = 10

/** In-place attempts of one transaction before the session gives up (~4 s in all). */
const COMMIT_ATTEMPTS = 5
/** How often a running slot asks the stream whether it changed leader or lost its tail. */
const STREAM_CHECK_MS = 2_000
/** A failover is looked for in what was applied since this many quiet stream checks ago. */
const SETTLED_CHECKS = 3
/** Marks are pruned every this many stream checks. */
const PRUNE_EVERY_ROUNDS = 30

/** Read through a call: TypeScript would otherwise keep a narrowing from an earlier check. */
function isAborted(signal: AbortSignal): boolean {
  return signal.aborted
}
