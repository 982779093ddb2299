/**
 * The hot path of a slot session as stages that overlap: while batch k commits
 * (processors/runner/commit.ts), batch k+1 is taken from the buffer and decided ({@link prepare}),
 * and when the two touch no sensor in common, batch k+1's transaction runs beside batch k's (see
 * {@link followsBeside}). Each commit records its checkpoint only after the one before it has
 * committed, and acks its batch only once committed itself, so the checkpoint is a low-watermark:
 * no sequence is recorded while a lower one is uncommitted. A failed commit ends the session
 * before any batch behind it is committed or acked; the next session starts again from the
 * checkpoint in Postgres.
 */
import type { JsMsg } from '@nats-io/jetstream'
import type { ProjectedEvent } from '../../projections/projection.ts'
import type { CheckpointPosition } from '../progress/checkpoints.ts'
import type { RejectReason } from '../../schemas/decode.ts'
import { SYSTEM_SOURCE } from '../../schemas/envelope.ts'
import { decide } from '../decision.ts'
import { BatchSpans } from '../tracing.ts'
import { isAborted, type SlotState } from './context.ts'

/**
 * Commits one prepared batch from checkpoint `from`. With `after` (the commit of the batch before,
 * still running), it applies beside it and moves the checkpoint only once `after` has left it at
 * `from`.
 */
export type Commit = (
  prepared: Prepared,
  from: CheckpointPosition,
  signal: AbortSignal,
  after?: Promise<CheckpointPosition>,
) => Promise<CheckpointPosition>

/** A commit in flight. */
interface InFlight {
  readonly prepared: Prepared
  /** Where it left the checkpoint: resolves once it committed (and acked). */
  readonly committed: Promise<CheckpointPosition>
  /** Where it leaves the checkpoint if it commits as prepared: undefined when that is not known. */
  readonly end: CheckpointPosition | undefined
  /** The turn of `state.exclusive` it runs in. */
  readonly turn: Turn
}

/**
 * Takes, decides and commits (with `commit`: processors/runner/commit.ts) batches until `signal`
 * aborts or something fails. When the buffer has nothing to give, `idle` is called once what was
 * taken is committed: it throws when the session must end (the consumer stopped, deliveries went
 * missing).
 */
export async function runPipeline(
  state: SlotState,
  commit: Commit,
  idle: () => Promise<void>,
  signal: AbortSignal,
): Promise<void> {
  /** At most {@link IN_FLIGHT} commits, oldest first; one that failed stays until thrown. */
  const inFlight: InFlight[] = []
  let failed = false
  /** The checkpoint the newest batch in flight will leave: what the next batch is prepared against. */
  let preparedTo = state.position.lastSeq
  const { batchSize, batchLingerMs } = state.ctx.deps.config.processor
  const sizes = batchRamp(batchSize)
  const settled = async (): Promise<void> => {
    // The oldest first: a commit that failed is thrown here, the others still awaited.
    while (inFlight.length > 0) await (inFlight[0] as InFlight).committed
  }
  try {
    await stages()
  } finally {
    // Never ends with a commit still running, whatever ended it: the slot is given back only
    // after the session has ended, and the slot fence (processors/progress/slot-fence.ts)
    // trusts that no commit of a session outlives it.
    await Promise.allSettled(inFlight.map((c) => c.committed))
  }

  async function stages(): Promise<void> {
    while (!isAborted(signal)) {
      const newest = inFlight.at(-1)
      const batch = await state.buffer.take(sizes.next(), batchLingerMs, signal, newest?.committed)
      if (state.diverged !== undefined) throw state.diverged
      // A commit failed: nothing more starts, and its failure is thrown below.
      if (failed) break
      if (batch.length === 0) {
        await settled() // what came before is committed (or its failure ends the session)
        await idle()
        continue
      }
      const prepared = prepare(state, batch, preparedTo)
      preparedTo = Math.max(preparedTo, prepared.lastSeq)
      // Beside the newest commit, if it is still running and nothing of the two meets; the
      // oldest of IN_FLIGHT committed first. Else after everything in flight.
      let before = inFlight.at(-1)
      if (before !== undefined && !followsBeside(before, prepared)) before = undefined
      if (before === undefined) await settled()
      else while (inFlight.length >= IN_FLIGHT) await (inFlight[0] as InFlight).committed
      // The one before may have ended meanwhile (its turn closed): then this one starts a turn.
      if (before !== undefined && !before.turn.open) {
        await settled()
        before = undefined
      }
      const started = before === undefined ? first(prepared) : beside(before, prepared)
      inFlight.push(started)
      // Committed, it leaves the list. A failure stays in it, to be thrown where it is awaited:
      // before the next commit, or at once when the loop is waiting for messages (the buffer
      // closes and the wait ends).
      started.committed.then(
        () => {
          const at = inFlight.indexOf(started)
          if (at >= 0) inFlight.splice(at, 1)
        },
        () => {
          failed = true
          state.buffer.close()
        },
      )
    }
    await settled()
  }

  /** A commit that starts a turn of `state.exclusive` (a stream check may be waiting for one). */
  function first(prepared: Prepared): InFlight {
    const turn = new Turn()
    let from: CheckpointPosition | undefined
    let resolve: (to: CheckpointPosition) => void = () => undefined
    let reject: (err: unknown) => void = () => undefined
    const committed = new Promise<CheckpointPosition>((res, rej) => {
      resolve = res
      reject = rej
    })
    void state
      .exclusive(async () => {
        try {
          // A check that ran while this batch waited moved the checkpoint back past it.
          if (state.diverged !== undefined) throw state.diverged
          from = state.position
          const done = commit(prepared, from, signal)
          turn.add(done)
          state.position = await done
          resolve(state.position)
        } catch (err) {
          reject(err)
        } finally {
          // The turn ends with the commits that started beside this one: no stream check
          // between them.
          await turn.settled()
        }
      })
      .catch(() => undefined)
    return {
      prepared,
      committed,
      turn,
      get end() {
        return from === undefined ? undefined : endOf(prepared, from)
      },
    }
  }

  /** A commit beside `before`, in its turn: checkpointed once `before` has committed. */
  function beside(before: InFlight, prepared: Prepared): InFlight {
    // A check that ran while this batch waited moved the checkpoint back past it.
    if (state.diverged !== undefined) throw state.diverged
    const from = before.end as CheckpointPosition
    state.ctx.counters.overlapped()
    const committed = commit(prepared, from, signal, before.committed).then((to) => {
      state.position = to
      return to
    })
    before.turn.add(committed)
    return { prepared, committed, turn: before.turn, end: endOf(prepared, from) }
  }
}

/** Commits in flight at once: one, and one beside it. */
const IN_FLIGHT = 2

/**
 * Commits in one turn of `state.exclusive` at most: the stream check (stream-watch.ts) waits for
 * the turn to end, and a backlog of disjoint batches would otherwise keep one turn open.
 */
const TURN_COMMITS = 16

/**
 * Whether `next` may commit beside `before` (still running): both commit as prepared (every
 * message taken applied, none refused: their checkpoints are known before they commit), and they
 * touch no rows in common. A projection's rows are a sensor's (its readings, status, alerts):
 * batches of disjoint sensors write disjoint rows, so neither waits on the other's locks but at
 * the checkpoint, which the later one moves only after the earlier one committed. A clock tick
 * touches every sensor of its partition: a batch that holds one commits alone.
 */
function followsBeside(before: InFlight, next: Prepared): boolean {
  if (
    !before.turn.open ||
    before.turn.size >= TURN_COMMITS ||
    before.end === undefined ||
    endOf(next, before.end) === undefined
  )
    return false
  const sensors = before.prepared.sensors
  if (sensors === undefined || next.sensors === undefined) return false
  for (const id of next.sensors) if (sensors.has(id)) return false
  return true
}

/**
 * Where `prepared` leaves the checkpoint from `from` if it commits as prepared (every message
 * taken past `from` applied, none refused or skipped after the last applied one), as commit.ts
 * moves it; undefined otherwise.
 */
function endOf(prepared: Prepared, from: CheckpointPosition): CheckpointPosition | undefined {
  const last = prepared.accepted.at(-1)
  if (
    prepared.refused.length > 0 ||
    last === undefined ||
    last.event.streamSeq !== prepared.lastSeq
  )
    return undefined
  let hlc = from.hlc
  for (const e of prepared.accepted)
    if (hlc === null || e.event.event.hlc > hlc) hlc = e.event.event.hlc
  return { lastSeq: prepared.lastSeq, hlc }
}

/**
 * One turn of `state.exclusive`: the commit that started it and those that started beside it.
 * It ends (`open` false) once every commit added has settled and none more came.
 */
class Turn {
  open = true
  readonly #commits: Promise<unknown>[] = []

  add(commit: Promise<unknown>): void {
    this.#commits.push(commit)
  }

  get size(): number {
    return this.#commits.length
  }

  /** Resolves once every commit added has settled, failed or not. */
  async settled(): Promise<void> {
    for (let seen = 0; seen < this.#commits.length;) {
      seen = this.#commits.length
      await Promise.allSettled(this.#commits)
    }
    this.open = false
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
  return {
    size: batch.length,
    newest,
    fresh,
    accepted,
    refused,
    spans,
    lastSeq,
    sensors: sensorsOf(accepted),
  }
}

/** The sensors `accepted` is about; undefined if it holds an event of the system (a clock tick). */
function sensorsOf(accepted: readonly Accepted[]): ReadonlySet<string> | undefined {
  const out = new Set<string>()
  for (const a of accepted) {
    const id = a.event.event.deviceId
    if (id === SYSTEM_SOURCE) return undefined
    out.add(id)
  }
  return out
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
  /** The sensors its accepted events are about; undefined if one is the system's (a clock tick). */
  readonly sensors: ReadonlySet<string> | undefined
}
