/**
 * `fleetstream rebuild <projection>` (blue/green, from sequence 1, swapped in once caught up) and
 * `fleetstream replay <projection>` (the checkpoint moved back, watched as it climbs again).
 */
import { Command, Option } from 'commander'
import { SET_UP_WAITS, setUpWithin } from '../../app/bounded-setup.ts'
import { oneShot } from '../command-process.ts'
import { JSON_HELP } from '../json-output.ts'
import {
  parseReplaySince,
  positiveInteger,
  processorName,
  timeoutOption,
  UsageError,
} from '../options.ts'
import { sleep } from '../../infra/sleep.ts'
import { PROCESSOR_NAMES, type ProcessorName } from '../../processors/processor-registry.ts'
import { rebuildProjection } from '../../processors/admin/rebuild-projection.ts'
import {
  moveCheckpointBack,
  replayProgress,
  replayStart,
  type ReplayFrom,
  type ReplayMove,
} from '../../processors/admin/replay.ts'
import { processorRunning } from '../../processors/progress/locks.ts'
import { shellUrl } from '../copy-paste.ts'
import { duration, fmt, progressBar } from '../progress.ts'
import type { Runtime } from '../../app/runtime.ts'

export function rebuildCommand(): Command {
  return new Command('rebuild')
    .description(
      'blue/green rebuild of a projection from sequence 1 into new tables while the live one keeps serving; swapped in atomically once caught up',
    )
    .argument(
      '<projection>',
      `the processor whose projection to rebuild: ${PROCESSOR_NAMES.join(', ')}`,
      processorName,
    )
    .addOption(
      new Option('--batch-size <n>', 'events per transaction into the new tables')
        .argParser(positiveInteger)
        .default(20_000),
    )
    .option(
      '--drop-retired',
      'drop the replaced tables after the swap instead of keeping them in a retired_* schema',
    )
    .option('--json', JSON_HELP.document('the result'))
    .addOption(timeoutOption(SET_UP_WAITS))
    .addHelpText(
      'after',
      `
The live projection answers queries throughout; the swap holds its tables for milliseconds. If the
rebuild fails or is killed, the live tables are untouched (a leftover rebuild_* schema is dropped by
the next rebuild). Exit codes: 0 swapped in, 1 failed, 2 bad usage.`,
    )
    .action(async (name: ProcessorName, opts: RebuildFlags) => {
      await oneShot('fleetstream-rebuild', opts, async (rt, signal) => {
        await setUpWithin(rt, opts.timeout, signal)
        await rebuild(rt, name, opts, signal)
      })
    })
}

export function replayCommand(): Command {
  return new Command('replay')
    .description(
      "re-apply events from a stream sequence or a time: moves the processor's checkpoint back and watches it catch up",
    )
    .argument(
      '<projection>',
      `the processor to replay: ${PROCESSOR_NAMES.join(', ')}`,
      processorName,
    )
    .addOption(
      new Option('--from-seq <n>', 'the first FLEET_EVENTS sequence to apply again').argParser(
        positiveInteger,
      ),
    )
    .addOption(
      new Option(
        '--since <time>',
        'from the first event stored at or after this time: ISO 8601 with a zone, or a duration ago (90s, 15m, 2h, 7d)',
      ).argParser((v) => parseReplaySince(v)),
    )
    .option(
      '--no-wait',
      'move the checkpoint back and exit without watching the processor catch up',
    )
    .option('--json', JSON_HELP.document('the result'))
    .addOption(timeoutOption(SET_UP_WAITS))
    .addHelpText(
      'after',
      `
Give exactly one of --from-seq and --since. The projections are idempotent: events applied before
change nothing; events missed or parked and since fixed are applied. A running processor notices at
once and re-anchors its consumer; a stopped one replays when it starts.`,
    )
    .action(async (name: ProcessorName, opts: ReplayFlags) => {
      if ((opts.fromSeq === undefined) === (opts.since === undefined)) {
        throw new UsageError(`give exactly one of '--from-seq <n>' and '--since <time>'`)
      }
      await oneShot('fleetstream-replay', opts, async (rt, signal) => {
        await setUpWithin(rt, opts.timeout, signal)
        await replay(rt, name, opts, signal)
      })
    })
}

interface RebuildFlags {
  batchSize: number
  dropRetired?: boolean
  json?: boolean
  timeout: number
}

/** Blue/green rebuild with a progress bar; see README. */
async function rebuild(
  rt: Runtime,
  name: ProcessorName,
  flags: RebuildFlags,
  signal: AbortSignal,
): Promise<void> {
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
    return
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
}

interface ReplayFlags {
  fromSeq?: number
  since?: ReplayFrom
  wait: boolean
  json?: boolean
  timeout: number
}

/** Moves the checkpoint back and watches the processor catch up. */
async function replay(
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
