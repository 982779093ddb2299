import {
  jetstream,
  type ConsumerMessages,
  type JetStreamClient,
  type JetStreamManager,
  type JsMsg,
} from '@nats-io/jetstream'
import type { NatsConnection } from '@nats-io/transport-node'
import { BrokenCircuitError, ExponentialBackoff } from 'cockatiel'
import type { Kysely } from 'kysely'
import type pg from 'pg'
import type { Config } from '../infra/config.ts'
import type { Logger } from '../infra/logger.ts'
import { createBreaker, isTransient, type Breaker, type BreakerState } from '../infra/failures.ts'
import { errorSummary } from '../infra/retry.ts'
import { sleep } from '../infra/sleep.ts'
import {
  advanceCheckpoint,
  CheckpointConflictError,
  readCheckpoint,
  type CheckpointPosition,
} from '../projections/checkpoints.ts'
import type { AnyProjection, ProjectedEvent } from '../projections/projection.ts'
import type { Database } from '../projections/tables.ts'
import { decodeEvent, type RejectReason } from '../schemas/decode.ts'
import { assertWithinOffset, ClockSkewError, decodeHlc } from '../schemas/hlc.ts'
import { Headers } from '../schemas/subjects.ts'
import { anchorConsumer, MessageBuffer, type ConsumerSpec } from './consumer.ts'
import { parkInDlq } from './dlq.ts'

/**
 * A processor: one durable consumer on FLEET_EVENTS feeding one projection.
 *
 * ```ts
 * export const readingsProcessor: ProcessorSpec = {
 *   name: 'readings', filterSubject: 'fleet.events.*.reading', projection: readingsProjection,
 * }
 * ```
 */
export interface ProcessorSpec {
  /** Durable consumer name, checkpoint key and DLQ subject token. */
  readonly name: string
  /** The one subject filter of its consumer (nats-server 2.9 allows one). */
  readonly filterSubject: string
  readonly projection: AnyProjection
  /** Runs beside the processor while it runs (e.g. the alerts' outbox relay). */
  readonly companion?: (deps: ProcessorDeps, signal: AbortSignal) => Promise<void>
}

export interface ProcessorDeps {
  readonly nc: NatsConnection
  readonly jsm: JetStreamManager
  readonly db: Kysely<Database>
  /** Pool the single-instance lock connection comes from. */
  readonly pool: pg.Pool
  readonly config: Config
  readonly log: Logger
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
  /** Stream sequence of the checkpoint. */
  checkpoint: number
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

/** The durable consumer a processor reads, from its spec and the configuration. */
export function consumerSpecOf(spec: ProcessorSpec, config: Config): ConsumerSpec {
  return {
    stream: config.streams.events,
    name: spec.name,
    filterSubject: spec.filterSubject,
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
  readonly #consumer: ConsumerSpec
  readonly #postgres: Breaker
  /** Events parked for handler failures since the last successful commit of any event. */
  #consecutivePoison = 0

  constructor(spec: ProcessorSpec, deps: ProcessorDeps) {
    this.name = spec.name
    this.#spec = spec
    this.#deps = deps
    this.#log = deps.log.child({ processor: spec.name })
    this.#js = jetstream(deps.nc)
    this.#consumer = consumerSpecOf(spec, deps.config)
    this.#postgres = createBreaker('postgres', this.#log)
    this.#postgres.policy.onStateChange(() => {
      this.stats.postgres = this.#postgres.state
    })
    const companion = spec.companion?.(deps, this.#stopping.signal).catch((err: unknown) => {
      this.#log.error({ err: errorSummary(err) }, `${spec.name} companion stopped`)
    })
    this.done = Promise.all([this.#supervise(), companion]).then(() => undefined)
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
        await this.#session(signal, () => (delay = backoff))
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

  /** One life of the processor: lock, anchor the consumer, consume until stopped or broken. */
  async #session(signal: AbortSignal, healthy: () => void): Promise<void> {
    // While the breaker is open this fails at once; after its backoff it lets one probe through.
    await this.#postgres.policy.execute(() => this.#deps.pool.query('select 1'))
    const lock = await this.#deps.pool.connect()
    const buffer = new MessageBuffer()
    const lockState: { lost?: Error } = {}
    const onLockError = (err: Error) => {
      lockState.lost = err
      buffer.close() // wake the loop: without the lock this session must end
    }
    lock.on('error', onLockError)
    let messages: ConsumerMessages | undefined
    try {
      await this.#acquireLock(lock, signal)
      if (signal.aborted) return
      const position = await readCheckpoint(this.#deps.db, this.name)
      this.stats.checkpoint = position.lastSeq
      const anchored = await anchorConsumer(this.#deps.jsm, this.#consumer, position)
      this.#log.info({ checkpoint: position.lastSeq, consumer: anchored }, 'processor running')
      this.stats.state = 'running'
      healthy()

      const consumer = await this.#js.consumers.get(this.#consumer.stream, this.#consumer.name)
      messages = await consumer.consume({
        max_messages: Math.min(
          this.#deps.config.processor.batchSize * 2,
          this.#consumer.maxAckPending,
        ),
        // Stop when the consumer disappears, so the session re-anchors it from the checkpoint.
        abort_on_missing_resource: true,
        callback: (m) => {
          buffer.push(m)
        },
      })
      const closed = messages.closed().then((err) => {
        buffer.close()
        return err
      })

      let from = position
      while (!isAborted(signal)) {
        const { batchSize, batchLingerMs } = this.#deps.config.processor
        const batch = await buffer.take(batchSize, batchLingerMs, signal)
        if (lockState.lost) {
          throw new Error('lost the connection holding the processor lock', {
            cause: lockState.lost,
          })
        }
        if (batch.length === 0) {
          if (buffer.closed) {
            const err = await closed
            throw new Error('consumer stopped', { cause: err ?? undefined })
          }
          continue
        }
        from = await this.#processBatch(batch, from, signal)
      }
    } finally {
      messages?.stop()
      // A lock connection that failed is destroyed; a healthy one goes back without its lock.
      // Our error listener stays until the pool has it back: a connection dying meanwhile (the
      // database going down as the session ends) with no listener would crash the process.
      if (!lockState.lost) {
        await lock.query('select pg_advisory_unlock_all()').catch((err: unknown) => {
          lockState.lost = err instanceof Error ? err : new Error(String(err))
        })
      }
      lock.release(lockState.lost)
      lock.off('error', onLockError)
    }
  }

  /** One active instance per processor; others wait on standby until it goes away. */
  async #acquireLock(lock: pg.PoolClient, signal: AbortSignal): Promise<void> {
    let announced = false
    while (!signal.aborted) {
      const r = await lock.query<{ ok: boolean }>(
        "select pg_try_advisory_lock(hashtext('fleetstream-processor'), hashtext($1)) as ok",
        [this.name],
      )
      if (r.rows[0]?.ok === true) return
      if (!announced) {
        this.stats.state = 'standby'
        this.#log.info('another instance holds the processor lock; standing by')
        announced = true
      }
      await sleep(1000 + Math.random() * 1000, signal)
    }
  }

  /**
   * Decode; park what is refused; apply the rest with the checkpoint, splitting the batch to
   * isolate an event the projection fails on every time; terminate what was parked; ack the batch.
   * Returns the new checkpoint. A transient failure (or too much poison at once) ends the session
   * with nothing of the uncommitted part applied or acked; the next session resumes at the checkpoint.
   */
  async #processBatch(
    batch: JsMsg[],
    from: CheckpointPosition,
    signal: AbortSignal,
  ): Promise<CheckpointPosition> {
    this.stats.received += batch.length
    const fresh: JsMsg[] = []
    const seen = new Set<number>()
    let newest: JsMsg | undefined
    for (const m of batch) {
      const seq = m.info.streamSequence
      if (newest === undefined || seq > newest.info.streamSequence) newest = m
      if (seq <= from.lastSeq || seen.has(seq)) {
        this.stats.skipped++
        continue
      }
      seen.add(seq)
      fresh.push(m)
    }
    if (newest === undefined) return from
    if (fresh.length === 0) {
      newest.ack()
      return from
    }

    const accepted: Accepted[] = []
    const parked: JsMsg[] = []
    for (const msg of fresh) {
      const redriveFor = msg.headers?.get(Headers.RedriveFor) ?? ''
      if (redriveFor !== '' && redriveFor !== this.name) {
        // Put back from the DLQ for another processor; this one applied the original.
        this.stats.skipped++
        continue
      }
      const decoded = this.#decode(msg, redriveFor !== '')
      if ('reason' in decoded) {
        // Refused as it is: no attempt can change that. Parked before any commit passes it.
        await this.#park({ msg, ...decoded, attempts: 1 })
        parked.push(msg)
      } else {
        accepted.push({ msg, event: decoded })
      }
    }

    let pos = await this.#applyIsolating(accepted, from, parked, signal)
    const lastSeq = fresh[fresh.length - 1]?.info.streamSequence ?? pos.lastSeq
    if (pos.lastSeq < lastSeq) pos = await this.#commit([], pos, { lastSeq, hlc: pos.hlc }, signal)

    for (const m of parked) m.term() // no reason: nats-server 2.9 would redeliver term(reason)
    newest.ack()
    this.stats.batches++
    this.stats.checkpoint = pos.lastSeq
    return pos
  }

  #decode(
    msg: JsMsg,
    redriven: boolean,
  ): ProjectedEvent | { reason: RejectReason; detail: string } {
    const decoded = decodeEvent({
      subject: msg.subject,
      data: msg.data,
      // A redriven copy has its own Nats-Msg-Id (redrive:...), not the eventId.
      msgId: redriven ? undefined : msg.headers?.get(Headers.MsgId),
    })
    if (!decoded.ok) return { reason: decoded.reason, detail: decoded.detail }
    const ingestedAt = new Date(Math.floor(msg.info.timestampNanos / 1e6))
    try {
      // Measured against the stream's append time, so a replay decides exactly the same way.
      assertWithinOffset(
        decodeHlc(decoded.event.hlc),
        ingestedAt.getTime(),
        this.#deps.config.hlcMaxOffsetMs,
      )
    } catch (err) {
      if (err instanceof ClockSkewError) return { reason: 'clock-skew', detail: err.message }
      throw err
    }
    return { event: decoded.event, streamSeq: msg.info.streamSequence, ingestedAt }
  }

  /**
   * Commits `events` (in stream order) with the checkpoint. When the projection fails on them
   * deterministically, each half is tried on its own, down to the one event that fails; that one
   * gets {@link POISON_ATTEMPTS} attempts, then is parked, and the rest goes on.
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
      if (this.#consecutivePoison >= MAX_CONSECUTIVE_POISON) {
        // Everything fails: a broken projection, not bad events. Stop and back off rather than
        // empty the stream into the DLQ; a fixed deployment (a restart) starts counting afresh.
        throw new Error(
          `${MAX_CONSECUTIVE_POISON} events in a row failed in the projection; treating it as systemic, not poison`,
          { cause: failure.cause },
        )
      }
      this.#consecutivePoison++
      await this.#park({
        msg: only.msg,
        reason: 'handler-failed',
        detail: errorSummary(failure.cause),
        attempts: POISON_ATTEMPTS,
      })
      parked.push(only.msg)
      this.stats.poisoned++
      return from
    }
  }

  async #park(d: {
    msg: JsMsg
    reason: RejectReason
    detail: string
    attempts: number
  }): Promise<void> {
    this.#log.warn(
      {
        seq: d.msg.info.streamSequence,
        subject: d.msg.subject,
        reason: d.reason,
        detail: d.detail,
        attempts: d.attempts,
      },
      'event parked in the DLQ',
    )
    await parkInDlq(this.#js, { processor: this.name, ...d })
    this.stats.rejected++
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
  ): Promise<CheckpointPosition> {
    let delay = new ExponentialBackoff({ initialDelay: 100, maxDelay: 2_000 }).next()
    for (let attempt = 1; ; attempt++) {
      const started = performance.now()
      try {
        await this.#postgres.policy.execute(() =>
          this.#deps.db.transaction().execute(async (trx) => {
            await this.#spec.projection.apply(trx, events)
            await advanceCheckpoint(trx, this.name, this.#consumer.stream, from, to)
          }),
        )
        this.stats.applied += events.length
        if (events.length > 0) this.#consecutivePoison = 0
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
        if (err instanceof CheckpointConflictError || signal.aborted) throw err
        if (!isTransient(err)) throw new DeterministicFailure(err)
        if (attempt >= COMMIT_ATTEMPTS || err instanceof BrokenCircuitError) {
          throw new Error(`not committed after ${attempt} attempts`, { cause: err })
        }
        this.stats.retries++
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
}

interface Accepted {
  readonly msg: JsMsg
  readonly event: ProjectedEvent
}

/** The projection failed on this input in a way a retry cannot fix. */
class DeterministicFailure extends Error {
  override readonly name = 'DeterministicFailure'
  constructor(cause: unknown) {
    super(errorSummary(cause), { cause })
  }
}

/** Attempts of one isolated event before it is parked. */
const POISON_ATTEMPTS = 3
/** More poison than this in a row, with no event applied in between, is a broken projection. */
const MAX_CONSECUTIVE_POISON = 10

/** In-place attempts of one transaction before the session gives up (~4 s in all). */
const COMMIT_ATTEMPTS = 5

/** Read through a call: TypeScript would otherwise keep a narrowing from an earlier check. */
function isAborted(signal: AbortSignal): boolean {
  return signal.aborted
}
