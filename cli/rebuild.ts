import { sleep } from '../infra/sleep.ts'
import type { ProcessorName } from '../processors/index.ts'
import { rebuildProjection, type RebuildResult } from '../processors/admin/rebuild-projection.ts'
import {
  moveCheckpointBack,
  replayProgress,
  replayStart,
  type ReplayFrom,
  type ReplayMove,
} from '../processors/admin/replay.ts'
import { processorRunning } from '../processors/progress/locks.ts'
import { shellUrl } from './copy-paste.ts'
import { parseSinceOption } from './events.ts'
import { duration, fmt, progressBar } from './progress.ts'
import type { Runtime } from './runtime.ts'

export interface RebuildFlags {
  batchSize: number
  dropRetired?: boolean
  json?: boolean
}

/** `fleetstream rebuild <projection>`: blue/green rebuild with a progress bar; see README. */
export async function rebuildCommand(
  rt: Runtime,
  name: ProcessorName,
  flags: RebuildFlags,
  signal: AbortSignal,
): Promise<RebuildResult> {
  const bar = progressBar(`rebuild ${name}`, { unit: 'events' })
  const result = await rebuildProjection(rt.processors[name], rt, {
    batchSize: flags.batchSize,
    keepRetired: flags.dropRetired !== true,
    signal,
    onProgress: (p) => {
      const note =
        p.phase === 'rebuilding'
          ? `at seq ${fmt(p.position)}, live at ${fmt(p.liveCheckpoint)}`
          : p.phase.replace('-', ' ')
      bar.update(p.applied, p.remaining === undefined ? undefined : p.applied + p.remaining, note)
    },
  }).finally(() => {
    bar.finish()
  })
  if (flags.json) {
    console.log(JSON.stringify(result))
    return result
  }
  const seconds = result.elapsedMs / 1000
  console.log(
    `rebuilt ${name}: ${fmt(result.applied)} events applied (${fmt(result.refused)} refused, ${fmt(result.skipped)} skipped) ` +
      `up to stream sequence ${fmt(result.checkpoint)} in ${seconds.toFixed(1)} s ` +
      `(${fmt(Math.round(result.applied / Math.max(seconds, 0.001)))} events/s); ` +
      `swapped in holding the live tables for ${Math.round(result.lockedMs)} ms` +
      (result.deferredSwaps > 0 ? ` (after ${result.deferredSwaps} deferred attempts)` : ''),
  )
  if (result.retired !== null) {
    console.log(
      `the replaced tables are in schema ${result.retired}; when no longer needed:\n` +
        `  psql ${shellUrl('DATABASE_URL', rt.config.databaseUrl)} -c 'drop schema ${result.retired} cascade'`,
    )
  }
  return result
}

export interface ReplayFlags {
  fromSeq?: number
  since?: ReplayFrom
  wait: boolean
  json?: boolean
}

/** `fleetstream replay <projection>`: moves the checkpoint back and watches the processor catch up. */
export async function replayCommand(
  rt: Runtime,
  name: ProcessorName,
  flags: ReplayFlags,
  signal: AbortSignal,
): Promise<void> {
  const spec = rt.processors[name]
  const started = Date.now()
  const from = await replayStart(spec, rt, flags.since ?? { seq: flags.fromSeq ?? 0 })
  const move = await moveCheckpointBack(spec, rt, from)
  const print = (extra: Record<string, unknown>) => {
    if (flags.json) console.log(JSON.stringify({ ...move, ...extra }))
  }
  if (!flags.json) {
    console.log(
      `replay ${name}: checkpoint moved back from ${fmt(move.previousCheckpoint)} to ${fmt(from - 1)}; ` +
        `processor ${name} applies everything from stream sequence ${fmt(from)} again`,
    )
  }
  if (!move.processorRunning || !flags.wait) {
    if (!flags.json && !move.processorRunning) {
      console.log(
        `processor ${name} is not running: it replays from ${fmt(from)} when it starts (fleetstream run ${name})`,
      )
    }
    print({ checkpoint: from - 1, caughtUp: false })
    return
  }
  const checkpoint = await watchReplay(rt, move, signal)
  const seconds = (Date.now() - started) / 1000
  if (!flags.json) {
    console.log(
      checkpoint >= move.previousCheckpoint
        ? `replayed ${name}: back at stream sequence ${fmt(checkpoint)} in ${duration(seconds)}`
        : `stopped watching at stream sequence ${fmt(checkpoint)}; processor ${name} carries on`,
    )
  }
  print({ checkpoint, caughtUp: checkpoint >= move.previousCheckpoint, elapsedMs: seconds * 1000 })
}

/** Shows the checkpoint climbing back until it reaches where it was, the signal aborts, or the processor stops (an error). */
async function watchReplay(rt: Runtime, move: ReplayMove, signal: AbortSignal): Promise<number> {
  const base = move.fromSeq - 1
  const span = Math.max(move.previousCheckpoint - base, 0)
  const bar = progressBar(`replay ${move.processor}`, { unit: 'sequences' })
  let checkpoint = base
  let absent = 0
  try {
    while (!signal.aborted) {
      const progress = await replayProgress(rt.db, move)
      checkpoint = progress.checkpoint
      bar.update(Math.max(checkpoint - base, 0), span, `at seq ${fmt(checkpoint)}`)
      if (progress.caughtUp) break
      absent = (await processorRunning(
        rt.db,
        rt.processors[move.processor as ProcessorName],
        rt.config,
      ))
        ? 0
        : absent + 1
      if (absent >= 8) {
        throw new Error(
          `processor ${move.processor} stopped at stream sequence ${checkpoint} before the replay caught up; it continues from there when it starts`,
        )
      }
      await sleep(250, signal)
    }
  } finally {
    bar.finish()
  }
  return checkpoint
}

/** `--since`, parsed as `events tail` parses it, keeping what the operator typed for messages. */
export function parseSince(text: string, now = Date.now()): ReplayFrom {
  return { since: parseSinceOption(text, now), text }
}
