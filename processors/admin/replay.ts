/**
 * Replays a processor from an earlier stream sequence (`fleetstream replay`): where to start, the
 * checkpoint moved back under the admin lock, and how far the processor has come back since.
 */
import { jetstream } from '@nats-io/jetstream'
import type { Kysely } from 'kysely'
import type { Database } from '../../projections/tables.ts'
import { consumerInfo } from '../runner/consumer.ts'
import { processorFilter, slotsOf } from '../partitions.ts'
import type { ProcessorDeps, ProcessorSpec } from '../runner/types.ts'
import { processorRunning, withAdminLock } from '../progress/locks.ts'
import { StreamReader } from '../stream-reader.ts'
import { lockCheckpoints, lowerCheckpoints, readCheckpointSeqs } from '../progress/checkpoints.ts'
import { OperatorError } from '../../schemas/errors.ts'

/** A replay asked for something that cannot be: names the option, the rule and the value. */
export class ReplayUsageError extends OperatorError {}

export type ReplayFrom = { readonly seq: number } | { readonly since: Date; readonly text: string }

/**
 * The stream sequence a replay starts at: `--from-seq N` as given (1 to the stream's last
 * sequence), or for `--since T` the first event of the processor's subject stored at or after T
 * (found with an ordered consumer's start time, which nats-server 2.9 supports).
 */
export async function replayStart(
  spec: ProcessorSpec,
  deps: ProcessorDeps,
  from: ReplayFrom,
): Promise<number> {
  const stream = deps.config.streams.events
  const info = await deps.jsm.streams.info(stream)
  const last = info.state.last_seq
  if ('seq' in from) {
    if (!Number.isSafeInteger(from.seq) || from.seq < 1 || from.seq > last) {
      throw new ReplayUsageError(
        `'--from-seq' must be an integer from 1 to the last sequence of ${stream} (${last}), got '${from.seq}'`,
      )
    }
    return from.seq
  }
  if (from.since.getTime() > Date.now()) {
    throw new ReplayUsageError(`'--since' must not be in the future, got '${from.text}'`)
  }
  const reader = await StreamReader.open(
    jetstream(deps.nc),
    stream,
    processorFilter(spec, deps.config),
    { time: from.since },
    { bufferSize: 1, headersOnly: true },
  )
  try {
    const first = (await reader.next(2000)) ?? (await reader.next(3000))
    if (first === undefined) {
      throw new ReplayUsageError(
        `'--since' must be at or before the newest event on ${processorFilter(spec, deps.config)} in ${stream}; none was stored at or after '${from.text}'`,
      )
    }
    return first.info.streamSequence
  } finally {
    await reader.close()
  }
}

export interface ReplayMove {
  readonly processor: string
  /** The first stream sequence applied again. */
  readonly fromSeq: number
  /** Where the checkpoint was (the highest of its partitions'): the replay is done when the processor is back there. */
  readonly previousCheckpoint: number
  /** Where each slot's checkpoint was (one per partition; see slotsOf). */
  readonly previous: Readonly<Record<string, number>>
  /** Whether an instance of the processor holds a lock (is running) right now. */
  readonly processorRunning: boolean
}

/**
 * Moves the processor's checkpoint back to `fromSeq - 1` (each partition's that lies beyond it),
 * so that its processor applies everything from `fromSeq` again (the projections are
 * idempotent: what was applied before changes nothing; what was missed or parked and since fixed
 * is applied now).
 *
 * Fenced like a second instance would be: the running processor's next commit finds the
 * checkpoint moved (CheckpointConflictError), rolls back, ends its session, re-reads the
 * checkpoint and re-anchors its consumer there. Its durable consumers are deleted as well, so an
 * idle session notices at once (the processor recreates them from the checkpoint). The
 * checkpoint's HLC, a high-water mark, stays. A checkpoint is never moved forward: that would
 * skip events.
 */
export async function moveCheckpointBack(
  spec: ProcessorSpec,
  deps: ProcessorDeps,
  fromSeq: number,
): Promise<ReplayMove> {
  const slots = slotsOf(spec, deps.config)
  return withAdminLock(deps.pool, spec.name, 'replay', async () => {
    // Asked first: the running processor lets go of its lock for a moment when it re-anchors.
    const running = await processorRunning(deps.db, spec, deps.config)
    const previous = await deps.db.transaction().execute(async (trx) => {
      const keys = slots.map((s) => s.key)
      const at = Object.fromEntries(
        [...(await lockCheckpoints(trx, keys))].map(([k, p]) => [k, p.lastSeq]),
      )
      const highest = Math.max(0, ...Object.values(at))
      if (fromSeq - 1 > highest) {
        throw new ReplayUsageError(
          `'--from-seq' must be at most the checkpoint of '${spec.name}' + 1 (${highest + 1}): moving a checkpoint forward would skip events, got '${fromSeq}'`,
        )
      }
      await lowerCheckpoints(trx, keys, fromSeq - 1)
      return at
    })
    const stream = deps.config.streams.events
    for (const slot of slots) {
      if ((await consumerInfo(deps.jsm, stream, slot.key)) !== undefined) {
        await deps.jsm.consumers.delete(stream, slot.key).catch(() => undefined)
      }
    }
    return {
      processor: spec.name,
      fromSeq,
      previousCheckpoint: Math.max(0, ...Object.values(previous)),
      previous,
      processorRunning: running,
    }
  })
}

/**
 * How far a replay has come back: caught up when every slot is back where it was; `checkpoint`
 * is the lowest checkpoint of the slots still behind (the highest once all are back).
 */
export async function replayProgress(
  db: Kysely<Database>,
  move: ReplayMove,
): Promise<{ checkpoint: number; caughtUp: boolean }> {
  const keys = Object.keys(move.previous)
  const at = await readCheckpointSeqs(db, keys)
  const behind = keys
    .filter((k) => (at.get(k) ?? 0) < (move.previous[k] ?? 0))
    .map((k) => at.get(k) ?? 0)
  return behind.length === 0
    ? { checkpoint: Math.max(0, ...at.values()), caughtUp: true }
    : { checkpoint: Math.min(...behind), caughtUp: false }
}
