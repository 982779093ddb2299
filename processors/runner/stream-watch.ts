/**
 * The divergence watch of a slot session: while it runs, compares the stream with the marks of
 * what was applied (processors/progress/stream-marks.ts) when something suggests the stream
 * changed under the checkpoint (a new leader, a reconnect, a shorter stream, a commit whose last
 * message no longer agrees), and moves the checkpoint back between two batches when it did.
 */
import { errorSummary } from '../../infra/retry.ts'
import { sleep } from '../../infra/sleep.ts'
import { CheckpointConflictError, type CheckpointPosition } from '../progress/checkpoints.ts'
import {
  findDivergence,
  pruneMarks,
  rewindCheckpoint,
  sweepMarks,
  sweepStart,
  type Divergence,
  type MarksToCompare,
} from '../progress/stream-marks.ts'
import { isAborted, type SlotState } from './context.ts'

/** What a slot session's stream check compares with: the stream leader and reconnects seen last. */
export interface StreamSeen {
  readonly leader: string | undefined
  readonly reconnects: number
}

/** How often a running slot asks the stream whether it changed leader or lost its tail. */
const STREAM_CHECK_MS = 2_000
/** A failover is looked for in what was applied since this many quiet stream checks ago. */
const SETTLED_CHECKS = 3
/** Marks are pruned every this many stream checks. */
const PRUNE_EVERY_ROUNDS = 30

function findDivergenceOf(
  state: SlotState,
  which: MarksToCompare,
): Promise<Divergence | undefined> {
  const { db, jsm } = state.ctx.deps
  const { stream, filterSubject } = state.consumer
  return findDivergence(db, jsm, stream, state.slot.key, filterSubject, which)
}

/**
 * Moves the checkpoint back from `position` to where the stream stopped agreeing with what this
 * slot applied (see processors/progress/stream-marks.ts). Returns the position to go on from.
 */
async function rewind(
  state: SlotState,
  found: Divergence,
  position: CheckpointPosition,
  why: string,
): Promise<CheckpointPosition> {
  // Never forward: a mark past the checkpoint is from before a replay moved it back.
  const toSeq = Math.min(found.mark.fromSeq, position.lastSeq)
  const to = await rewindCheckpoint(state.ctx.deps.db, state.slot.key, position, toSeq)
  if (to.lastSeq === position.lastSeq) return position
  state.log.warn(
    {
      slot: state.slot.key,
      why,
      range: `${found.mark.fromSeq + 1}-${found.mark.lastSeq}`,
      found: found.found,
      checkpoint: position.lastSeq,
      rewoundTo: to.lastSeq,
    },
    'the stream no longer holds what was applied at this sequence; reading again from before it',
  )
  state.ctx.counters.rewound()
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
export async function watchStream(
  state: SlotState,
  seen: StreamSeen,
  signal: AbortSignal,
): Promise<void> {
  const { jsm, db } = state.ctx.deps
  let { leader, reconnects } = seen
  // The session-start comparison is retried each round until it has run once.
  let startDue: { sessionStart: number } | undefined = { sessionStart: state.position.lastSeq }
  let due: string | undefined
  // The checkpoint at the last few checks that saw nothing wrong: what a failover can have
  // rewritten was applied after the oldest of them (kept a few checks back, for the tail
  // read just before the change was seen).
  const settled: number[] = [state.position.lastSeq]
  let swept = await sweepStart(db, state.slot.key).catch(() => 0)
  for (let round = 1; !isAborted(signal) && state.diverged === undefined; round++) {
    if (startDue === undefined) await sleep(STREAM_CHECK_MS, signal)
    if (isAborted(signal)) return
    try {
      if (startDue !== undefined) {
        const found = await findDivergenceOf(state, startDue)
        startDue = undefined
        if (found !== undefined) await rewindBeside(state, found, 'session start', signal)
        continue
      }
      // Taken before asking: the info's last sequence is from when the server answered, and at a
      // steady rate events delivered since then would make every check look like a lost tail
      // (and read the last seconds back message by message).
      const delivered = state.delivered
      const info = await jsm.streams.info(state.consumer.stream)
      const now = info.cluster?.leader
      if (now !== leader) due ??= `new stream leader ${now ?? '(none)'}`
      if (info.state.last_seq < delivered) due ??= 'the stream ends below what was delivered'
      if (state.ctx.reconnects() !== reconnects) due ??= 'reconnected to NATS'
      leader = now
      reconnects = state.ctx.reconnects()
      const sweep = await sweepMarks(db, jsm, state.consumer.stream, state.slot.key, swept)
      let afterSeq = settled[0] ?? 0
      if (sweep.disagreesAt !== undefined) {
        due ??= 'a commit no longer agrees with the stream'
        afterSeq = Math.min(afterSeq, sweep.sweptTo)
      }
      if (due !== undefined) {
        const why = due
        // Compared while batches go on: only moving the checkpoint waits for the batch in hand.
        const found = await findDivergenceOf(state, { afterSeq })
        if (found !== undefined) await rewindBeside(state, found, why, signal)
        due = undefined
      }
      // Past a disagreement once the full check has run (it went back, or there was nothing
      // to go back for: a message aged out of the stream).
      swept = sweep.disagreesAt ?? sweep.sweptTo
      settled.push(state.position.lastSeq)
      if (settled.length > SETTLED_CHECKS) settled.shift()
      if (round % PRUNE_EVERY_ROUNDS === 0) await pruneMarks(db, state.slot.key)
    } catch (err) {
      if (err instanceof CheckpointConflictError) {
        state.diverged = err
        state.buffer.close()
        return
      }
      // NATS or Postgres not answering: try again next round, the check still due.
      state.log.debug({ err: errorSummary(err) }, 'stream check failed; trying again')
      if (startDue !== undefined) await sleep(STREAM_CHECK_MS, signal)
    }
  }
}

/**
 * Moves the checkpoint back to before `found`, between two batches, and ends the session so
 * the next one anchors there.
 */
async function rewindBeside(
  state: SlotState,
  found: Divergence,
  why: string,
  signal: AbortSignal,
): Promise<void> {
  await state.exclusive(async () => {
    if (state.diverged !== undefined || isAborted(signal)) return
    const from = state.position
    const to = await rewind(state, found, from, why)
    if (to.lastSeq === from.lastSeq) return
    state.position = to
    state.ctx.counters.checkpointAt(state.slot.key, to.lastSeq)
    state.diverged = new Error(
      `the stream changed under the checkpoint (${why}); re-anchoring at ${to.lastSeq}`,
    )
    state.buffer.close()
  })
}
