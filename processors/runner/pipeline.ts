/**
 * The hot path of a slot session as two stages that overlap: while batch k commits
 * (processors/runner/commit.ts), batch k+1 is taken from the buffer and decided
 * ({@link prepare}). Commits run one at a time in stream order, and each acks its batch only once
 * committed, so the checkpoint is a low-watermark: no sequence is recorded while a lower one is
 * uncommitted. A failed commit ends the session before the batch prepared behind it is committed
 * or acked; the next session starts again from the checkpoint in Postgres.
 */
import type { JsMsg } from '@nats-io/jetstream'
import type { ProjectedEvent } from '../../projections/projection.ts'
import type { CheckpointPosition } from '../progress/checkpoints.ts'
import type { RejectReason } from '../../schemas/decode.ts'
import { decide } from '../decision.ts'
import { BatchSpans } from '../tracing.ts'
import { isAborted, type SlotState } from './context.ts'

/**
 * Takes, decides and commits (with `commit`: processors/runner/commit.ts) batches until `signal`
 * aborts or something fails. When the buffer has nothing to give, `idle` is called once what was
 * taken is committed: it throws when the session must end (the consumer stopped, deliveries went
 * missing).
 */
export async function runPipeline(
  state: SlotState,
  commit: (
    prepared: Prepared,
    from: CheckpointPosition,
    signal: AbortSignal,
  ) => Promise<CheckpointPosition>,
  idle: () => Promise<void>,
  signal: AbortSignal,
): Promise<void> {
  let committing: Promise<void> | undefined
  /** The checkpoint the batch in flight will leave: what the next batch is prepared against. */
  let preparedTo = state.position.lastSeq
  const { batchSize, batchLingerMs } = state.ctx.deps.config.processor
  const sizes = batchRamp(batchSize)
  try {
    await stages()
  } finally {
    // Never ends with a commit still running, whatever ended it: the slot is given back only
    // after the session has ended, and the slot fence (processors/progress/slot-fence.ts)
    // trusts that no commit of a session outlives it.
    await committing?.catch(() => undefined)
  }

  async function stages(): Promise<void> {
    while (!isAborted(signal)) {
      const batch = await state.buffer.take(sizes.next(), batchLingerMs, signal, committing)
      if (state.diverged !== undefined) throw state.diverged
      if (batch.length === 0) {
        await committing // what came before is committed (or its failure ends the session)
        await idle()
        continue
      }
      const prepared = prepare(state, batch, preparedTo)
      preparedTo = Math.max(preparedTo, prepared.lastSeq)
      await committing
      const committed = state.exclusive(async () => {
        // A check that ran while this batch waited moved the checkpoint back past it.
        if (state.diverged !== undefined) throw state.diverged
        state.position = await commit(prepared, state.position, signal)
      })
      // Its failure is thrown where it is awaited: before the next commit, or at once when the
      // loop is waiting for messages (the buffer closes and the wait ends).
      committed.catch(() => {
        state.buffer.close()
      })
      committing = committed
    }
    await committing
  }
}

/**
 * The size of each batch a session takes: {@link FIRST_BATCH} first, then twice the one before,
 * up to the configured `batchSize`. The first applied batch is what an operator waits for at
 * start-up, and its cost is mostly code the process has not compiled yet (decode, decide, build
 * the SQL: ~0.3 CPU-s for a first batch of 1,000 on this project's 2-core VM, most of it once per
 * process); a small one commits sooner, and so does the batch prepared while it commits. The ramp
 * to 1,000 costs four extra commits per session.
 */
export function batchRamp(batchSize: number): { next(): number } {
  let size = Math.min(batchSize, FIRST_BATCH)
  return {
    next() {
      const now = size
      size = Math.min(batchSize, size * 2)
      return now
    },
  }
}

/** The size of a session's first batch (see {@link batchRamp}). */
export const FIRST_BATCH = 64

/**
 * The first stage, while the batch before it commits: drops what is at or below `from` (the
 * checkpoint the batch in flight leaves) or repeated, and decides the rest in stream order.
 * Pure CPU: nothing is parked, written or acked here.
 */
function prepare(state: SlotState, batch: JsMsg[], from: number): Prepared {
  const counters = state.ctx.counters
  counters.received(batch.length)
  const spans = new BatchSpans(state.slot.processor, state.slot.filterSubject, batch)
  const fresh: JsMsg[] = []
  let newest: JsMsg | undefined
  // Deliveries come in stream order but for redeliveries: only a batch out of order needs the
  // dedup set and the sort.
  let seen: Set<number> | undefined
  for (const m of batch) {
    const seq = m.info.streamSequence
    const top = newest?.info.streamSequence ?? 0
    if (seq > top) newest = m
    else seen ??= new Set(fresh.map((f) => f.info.streamSequence))
    if (seq <= from || seen?.has(seq) === true) {
      counters.skipped()
      continue
    }
    seen?.add(seq)
    fresh.push(m)
  }
  if (seen !== undefined) fresh.sort((a, b) => a.info.streamSequence - b.info.streamSequence)
  const accepted: Accepted[] = []
  const refused: Refused[] = []
  for (const msg of fresh) {
    const d = decide(msg, state.ctx.spec, state.ctx.deps.config)
    if (d.kind === 'skip') {
      // Put back from the DLQ for another processor (this one applied the original), or of a
      // kind this processor does not read.
      counters.skipped()
      continue
    }
    if (spans.tracing) {
      spans.event(
        msg,
        d.kind === 'apply'
          ? { correlationId: d.event.event.correlationId, hlc: d.event.event.hlc }
          : undefined,
      )
    }
    if (d.kind === 'refuse') refused.push({ msg, reason: d.reason, detail: d.detail })
    else accepted.push({ msg, event: d.event })
  }
  const lastSeq = fresh[fresh.length - 1]?.info.streamSequence ?? from
  return { size: batch.length, newest, fresh, accepted, refused, spans, lastSeq }
}

export interface Accepted {
  readonly msg: JsMsg
  readonly event: ProjectedEvent
}

interface Refused {
  readonly msg: JsMsg
  readonly reason: RejectReason
  readonly detail: string
}

/** A batch taken and decided, waiting for the batch before it to commit. */
export interface Prepared {
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
