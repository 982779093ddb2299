import {
  jetstream,
  jetstreamManager,
  type ConsumerMessages,
  type JetStreamClient,
  type JsMsg,
} from '@nats-io/jetstream'
import type { NatsConnection } from '@nats-io/transport-node'
import { ExponentialBackoff } from 'cockatiel'
import type { Kysely } from 'kysely'
import type pg from 'pg'
import type { Config } from '../infra/config.ts'
import type { Logger } from '../infra/logger.ts'
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
  /** Batches whose transaction failed and was retried. */
  retries: number
  state: 'starting' | 'standby' | 'running' | 'backing-off' | 'stopped'
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
    state: 'starting',
  }
  readonly done: Promise<void>
  readonly #spec: ProcessorSpec
  readonly #deps: ProcessorDeps
  readonly #log: Logger
  readonly #js: JetStreamClient
  readonly #stopping = new AbortController()
  readonly #consumer: ConsumerSpec

  constructor(spec: ProcessorSpec, deps: ProcessorDeps) {
    this.name = spec.name
    this.#spec = spec
    this.#deps = deps
    this.#log = deps.log.child({ processor: spec.name })
    this.#js = jetstream(deps.nc)
    this.#consumer = consumerSpecOf(spec, deps.config)
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
      const jsm = await jetstreamManager(this.#deps.nc)
      const anchored = await anchorConsumer(jsm, this.#consumer, position)
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
      lock.off('error', onLockError)
      // A lock connection that failed is destroyed; a healthy one goes back without its lock.
      if (lockState.lost) lock.release(lockState.lost)
      else {
        await lock.query('select pg_advisory_unlock_all()').catch(() => undefined)
        lock.release()
      }
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
   * Decode, park what is refused, apply the rest with the checkpoint in one transaction, then
   * ack. Returns the new checkpoint. A failed transaction is retried a few times on the same
   * batch; if it still fails, the error ends the session (nothing of the batch was applied or
   * acked) and the next session starts again from the checkpoint.
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

    const accepted: ProjectedEvent[] = []
    const refused: { msg: JsMsg; reason: RejectReason; detail: string }[] = []
    let hlc = from.hlc
    for (const msg of fresh) {
      const decoded = decodeEvent({
        subject: msg.subject,
        data: msg.data,
        msgId: msg.headers?.get(Headers.MsgId),
      })
      if (!decoded.ok) {
        refused.push({ msg, reason: decoded.reason, detail: decoded.detail })
        continue
      }
      const ingestedAt = new Date(Math.floor(msg.info.timestampNanos / 1e6))
      try {
        // Measured against the stream's append time, so a replay decides exactly the same way.
        assertWithinOffset(
          decodeHlc(decoded.event.hlc),
          ingestedAt.getTime(),
          this.#deps.config.hlcMaxOffsetMs,
        )
      } catch (err) {
        if (!(err instanceof ClockSkewError)) throw err
        refused.push({ msg, reason: 'clock-skew', detail: err.message })
        continue
      }
      accepted.push({ event: decoded.event, streamSeq: msg.info.streamSequence, ingestedAt })
      if (hlc === null || decoded.event.hlc > hlc) hlc = decoded.event.hlc
    }

    // Park before committing: once the checkpoint passes an event, it is never looked at again.
    for (const r of refused) {
      this.#log.warn(
        {
          seq: r.msg.info.streamSequence,
          subject: r.msg.subject,
          reason: r.reason,
          detail: r.detail,
        },
        'event refused; parked in the DLQ',
      )
    }
    await Promise.all(refused.map((r) => parkInDlq(this.#js, { processor: this.name, ...r })))

    const to: CheckpointPosition = {
      lastSeq: Math.max(...fresh.map((m) => m.info.streamSequence)),
      hlc,
    }
    const started = performance.now()
    await this.#commit(signal, async () => {
      await this.#deps.db.transaction().execute(async (trx) => {
        await this.#spec.projection.apply(trx, accepted)
        await advanceCheckpoint(trx, this.name, this.#consumer.stream, from, to)
      })
    })
    newest.ack()
    this.#log.debug(
      {
        size: batch.length,
        applied: accepted.length,
        refused: refused.length,
        to: to.lastSeq,
        commitMs: Math.round(performance.now() - started),
      },
      'batch committed',
    )
    this.stats.applied += accepted.length
    this.stats.rejected += refused.length
    this.stats.batches++
    this.stats.checkpoint = to.lastSeq
    return to
  }

  /**
   * Rides out a blip (a dropped connection, a serialization failure) in place. A longer outage
   * ends the session instead of holding the batch: messages held past ack_wait would be
   * redelivered into the buffer again and again, and memory would grow with the outage.
   */
  async #commit(signal: AbortSignal, tx: () => Promise<void>): Promise<void> {
    let delay = new ExponentialBackoff({ initialDelay: 100, maxDelay: 2_000 }).next()
    for (let attempt = 1; ; attempt++) {
      try {
        await tx()
        return
      } catch (err) {
        // Someone else moved the checkpoint: end the session, re-read it and re-anchor.
        if (err instanceof CheckpointConflictError || signal.aborted) throw err
        if (attempt >= COMMIT_ATTEMPTS) {
          throw new Error(`batch not committed after ${attempt} attempts`, { cause: err })
        }
        this.stats.retries++
        this.#log.warn(
          { err: errorSummary(err), retryInMs: Math.round(delay.duration) },
          'batch not committed; retrying',
        )
        await sleep(delay.duration, signal)
        if (isAborted(signal))
          throw new Error('stopped before the batch could be committed', { cause: err })
        delay = delay.next(undefined)
      }
    }
  }
}

/** In-place attempts of one batch's transaction before the session gives up (~4 s in all). */
const COMMIT_ATTEMPTS = 5

/** Read through a call: TypeScript would otherwise keep a narrowing from an earlier check. */
function isAborted(signal: AbortSignal): boolean {
  return signal.aborted
}
