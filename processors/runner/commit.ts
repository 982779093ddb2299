/**
 * The second stage of a slot session (processors/runner/pipeline.ts), one batch at a time in
 * stream order: parks what was refused, applies the rest in one transaction with the checkpoint
 * (processors/progress/checkpoints.ts), isolates an event the projection fails on every time and
 * parks it (the poison), terminates what was parked and acks the batch.
 */
import type { JsMsg } from '@nats-io/jetstream'
import { context, trace } from '@opentelemetry/api'
import { BrokenCircuitError, ExponentialBackoff, handleType, handleWhen, retry } from 'cockatiel'
import { sql, type Transaction } from 'kysely'
import { BadInputError, TransientError } from '../../schemas/errors.ts'
import { copyOf } from '../../infra/copy-connection.ts'
import { isDataError, isJetStreamUnavailable, isTransient } from '../../infra/failures.ts'
import { errorSummary } from '../../infra/retry.ts'
import { sleep } from '../../infra/sleep.ts'
import { dlqStreamSpec } from '../../infra/streams.ts'
import { traceFields } from '../../infra/telemetry.ts'
import type { CopySend } from '../../projections/copy-rows.ts'
import type { ProjectedEvent } from '../../projections/projection.ts'
import type { Database } from '../../projections/tables.ts'
import type { RejectReason } from '../../schemas/decode.ts'
import { Headers } from '../../schemas/subjects.ts'
import { parkInDlq } from '../dlq/park.ts'
import { readableHeaders } from '../message-headers.ts'
import {
  advanceCheckpoint,
  CheckpointConflictError,
  type CheckpointPosition,
} from '../progress/checkpoints.ts'
import { markOf } from '../progress/stream-marks.ts'
import type { BatchSpans } from '../tracing.ts'
import { isAborted, type SlotState } from './context.ts'
import type { Accepted, Prepared } from './pipeline.ts'

/** Commits the batches of one slot session, one at a time. */
export class BatchCommitter {
  readonly #s: SlotState
  /** Spans of the batch in hand (one batch at a time). */
  #spans: BatchSpans | undefined
  /** The new messages of the batch in hand, in stream order: each commit marks its range of them. */
  #inHand: readonly JsMsg[] = []

  constructor(state: SlotState) {
    this.#s = state
  }

  /**
   * The second stage, one batch at a time in stream order: parks what was refused; applies the
   * rest with the checkpoint, splitting the batch to isolate an event the projection fails on
   * every time; terminates what was parked; acks the batch. Returns the new checkpoint. A
   * transient failure (or too much poison at once) ends the session with nothing of the
   * uncommitted part applied or acked; the next session resumes at the checkpoint.
   */
  async commitBatch(
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
    this.#s.ctx.counters.checkpointAt(this.#s.slot.key, pos.lastSeq)
    this.#s.ctx.counters.batch(prepared.size, (performance.now() - started) / 1000)
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
      try {
        // Attempts 2 to POISON_ATTEMPTS of the one event, each after a pause (the first was above).
        return await POISON_RETRY.execute(async ({ attempt }) => {
          await sleep(POISON_PAUSE_MS * (attempt + 2), signal)
          return this.#commit([only.event], from, to, signal)
        })
      } catch (again) {
        if (!(again instanceof DeterministicFailure)) throw again
        failure = again
      }
      if (this.#s.ctx.poison.get() >= MAX_CONSECUTIVE_POISON) {
        // Everything fails: a broken projection, not bad events. Stop and back off rather than
        // empty the stream into the DLQ; a fixed deployment (a restart) starts counting afresh.
        throw new Error(
          `${MAX_CONSECUTIVE_POISON} events in a row failed in the projection; treating it as systemic, not poison`,
          { cause: failure.cause },
        )
      }
      this.#s.ctx.poison.set(this.#s.ctx.poison.get() + 1)
      await this.#park({
        msg: only.msg,
        reason: 'handler-failed',
        detail: errorSummary(failure.cause),
        attempts: POISON_ATTEMPTS,
      })
      parked.push(only.msg)
      this.#s.ctx.counters.poisoned()
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
      correlationId: readableHeaders(d.msg)?.get(Headers.CorrelationId) || undefined,
      seq: d.msg.info.streamSequence,
      subject: d.msg.subject,
      reason: d.reason,
      detail: d.detail,
      attempts: d.attempts,
    }
    const { config, nc } = this.#s.ctx.deps
    const limits = {
      maxEntryBytes: Math.min(
        dlqStreamSpec(config.streams).max_msg_size,
        nc.info?.max_payload ?? Number.POSITIVE_INFINITY,
      ),
    }
    const signal = this.#s.stop
    let stub = false
    let attempt = 0
    const again = retry(
      handleWhen(() => !isAborted(signal)),
      { maxAttempts: PARK_ATTEMPTS - 1, backoff: PARK_BACKOFF },
    )
    again.onRetry((e) => {
      const err = 'error' in e ? e.error : undefined
      const refused = !isJetStreamUnavailable(err) && !isTransient(err)
      this.#s.log.warn(
        { ...fields, err: errorSummary(err), attempt, retryInMs: Math.round(e.delay) },
        refused && !stub
          ? 'the DLQ refused the entry; parking a stub that points at the original instead'
          : 'parking in the DLQ failed; retrying',
      )
      if (refused) stub = true
    })
    let duplicate: boolean
    try {
      duplicate = await again.execute(async () => {
        attempt++
        const parked = await parkInDlq(
          this.#s.ctx.js,
          { processor: this.#s.slot.processor, ...d },
          limits,
          { stub },
        )
        this.#s.log.warn(
          {
            ...fields,
            dlqSeq: parked.seq,
            ...(parked.duplicate ? { duplicate: true } : {}),
            ...(parked.cut.length > 0 ? { cut: parked.cut } : {}),
            ...(stub ? { stub } : {}),
          },
          'event parked in the DLQ',
        )
        return parked.duplicate
      })
    } catch (err) {
      this.#s.log.error(
        { ...fields, err: errorSummary(err), attempt },
        'could not park the event in the DLQ; the session ends and the event is tried again',
      )
      throw new Error(
        `could not park stream sequence ${d.msg.info.streamSequence} in the DLQ after ${attempt} attempts`,
        { cause: err },
      )
    }
    // Parked before (a batch applied again after a crash, within the DLQ's duplicate window):
    // the DLQ holds it once, and so does the count.
    if (!duplicate) this.#s.ctx.counters.parked(d.reason)
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
    let attempts = 0
    let last: unknown
    const inPlace = retry(
      handleWhen(
        (err) =>
          !signal.aborted &&
          isTransient(err) &&
          !(err instanceof BrokenCircuitError) &&
          !(err instanceof CheckpointConflictError) &&
          !(err instanceof StorageRefused),
      ),
      { maxAttempts: COMMIT_ATTEMPTS - 1, backoff: COMMIT_BACKOFF },
    )
    inPlace.onRetry((e) => {
      this.#s.ctx.counters.retried()
      this.#s.log.warn(
        { err: errorSummary('error' in e ? e.error : undefined), retryInMs: Math.round(e.delay) },
        'transaction failed; retrying',
      )
    })
    try {
      return await inPlace.execute(async () => {
        if (attempts > 0 && isAborted(signal)) {
          throw new StoppedError('stopped before the batch could be committed', { cause: last })
        }
        attempts++
        const started = performance.now()
        try {
          await this.#s.ctx.postgres.policy.execute(() =>
            this.#s.ctx.deps.db.transaction().execute(async (trx) => {
              const copy = await copyOf(trx)
              if (eachUnderSavepoint) await this.#applyEach(trx, events, copy)
              else await this.#s.ctx.spec.projection.apply(trx, events, copy)
              await advanceCheckpoint(
                trx,
                this.#s.slot.key,
                this.#s.consumer.stream,
                from,
                to,
                mark,
              )
            }),
          )
        } catch (err) {
          last = err
          throw err
        }
        this.#s.ctx.counters.committed(events)
        if (events.length > 0) this.#s.ctx.poison.set(0)
        this.#s.log.debug(
          {
            applied: events.length,
            to: to.lastSeq,
            commitMs: Math.round(performance.now() - started),
          },
          'committed',
        )
        return to
      })
    } catch (err) {
      // Someone else moved the checkpoint: end the session, re-read it and re-anchor.
      if (err instanceof CheckpointConflictError || err instanceof StorageRefused) throw err
      if (err instanceof StoppedError || signal.aborted) throw err
      if (!isTransient(err)) throw new DeterministicFailure(err)
      throw new Error(`not committed after ${attempts} attempts`, { cause: err })
    }
  }

  /**
   * Applies each event under its own savepoint; throws {@link StorageRefused} (after trying them
   * all) when Postgres refused the values of some. Any other failure ends the transaction.
   */
  async #applyEach(
    trx: Transaction<Database>,
    events: readonly ProjectedEvent[],
    copy: CopySend | undefined,
  ): Promise<void> {
    const refused: { seq: number; cause: unknown }[] = []
    for (const e of events) {
      await sql`savepoint fleet_event`.execute(trx)
      try {
        await this.#s.ctx.spec.projection.apply(trx, [e], copy)
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

/** Postgres refused the values of these events (by stream sequence); the rest applied cleanly. */
class StorageRefused extends BadInputError {
  constructor(readonly refused: readonly { readonly seq: number; readonly cause: unknown }[]) {
    super(`Postgres refused ${refused.length} event(s): ${errorSummary(refused[0]?.cause)}`)
  }
}

/** The projection failed on this input in a way a retry cannot fix. */
class DeterministicFailure extends BadInputError {
  constructor(cause: unknown) {
    super(errorSummary(cause), { cause })
  }
}

/** The session stopped while a commit waited to be tried again. */
class StoppedError extends TransientError {}

/** Attempts to park one event (with backoff, ~10 s in all) before the session ends. */
const PARK_ATTEMPTS = 6
const PARK_BACKOFF = new ExponentialBackoff({ initialDelay: 200, maxDelay: 5_000 })
/** Attempts of one isolated event before it is parked. */
const POISON_ATTEMPTS = 3
/** Attempt n of an isolated event waits n times this first. */
const POISON_PAUSE_MS = 100
/** The isolated event's attempts after its first: only a deterministic failure is tried again. */
const POISON_RETRY = retry(handleType(DeterministicFailure), { maxAttempts: POISON_ATTEMPTS - 2 })
/**
 * More poison than this in a row, with no event applied in between, is a broken projection. Events
 * whose values Postgres refuses (parked as `storage-refused`) are not counted: they are the events'
 * fault, and a burst of them must not stop the processor.
 */
const MAX_CONSECUTIVE_POISON = 10

/** In-place attempts of one transaction before the session gives up (~4 s in all). */
const COMMIT_ATTEMPTS = 5
const COMMIT_BACKOFF = new ExponentialBackoff({ initialDelay: 100, maxDelay: 2_000 })
