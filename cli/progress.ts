/**
 * What long commands show while they work: `start`'s status and the bars of `rebuild`, `replay`
 * and `dlq redrive`. On a terminal they redraw in place through a {@link liveRegion}
 * (cli-progress draws it; every line is cut to the terminal's width, logs go above); elsewhere
 * (a pipe, a log file, CI) they print a plain line every 5 s and the last state at the end.
 *
 * Why the line's text is ours and not cli-progress's format tokens: cli-progress already does
 * the drawing (cursor moves, throttling, logs above, the hidden cursor); what it lacks is what
 * this file adds: a total that is unknown for a while (its ETA and percentage need one), a rate
 * smoothed over the last seconds instead of since the start, a bar that shrinks and then goes on
 * a narrow terminal before the count does, and `start`'s several lines of figures read once a
 * second. Its non-terminal output (`noTTYOutput`) prints the bar unchanged; ours prints the
 * figures as plain lines that a log reads well.
 */
import type { Publisher } from '../infra/publisher.ts'
import type { RunningProcessor } from '../processors/runner/types.ts'
import type { Runtime } from '../app/runtime.ts'
import { startSampler, type StartSample } from './start-sampler.ts'
import { columnsOf, fit, liveRegion, type LiveRegion } from './terminal.ts'

/** Plain lines this far apart when the output is not a terminal. */
const PLAIN_EVERY_MS = 5000

export interface Progress {
  /** Resolves once every processor's consumer has nothing pending (or the signal aborts). */
  caughtUp(signal: AbortSignal): Promise<void>
  /** Prints whole lines above the status (on a terminal) or between its lines. */
  note(text: string): void
  stop(): Promise<void>
}

/**
 * The live status of `fleetstream start` on stderr, so that stdout holds only what the command
 * reports. On a terminal, a line for the publisher and one per processor:
 *
 * ```txt
 * published 12,345 events, 617 duplicates refused, 199/s
 *   sensor-status  applied 12,300  refused 0  lag 0
 *   readings       applied 12,290  refused 0  lag 12
 * ```
 *
 * Elsewhere the same on one line every 5 s.
 */
export function startProgress(
  rt: Runtime,
  running: readonly RunningProcessor[],
  publisher: Publisher,
  out: NodeJS.WriteStream = process.stderr,
): Progress {
  let sample: StartSample = { lags: new Map(), rate: 0 }
  let lastPrint = 0

  const lagOf = (p: RunningProcessor) => {
    const lag = sample.lags.get(p.name)
    return lag === undefined || lag === null ? '?' : fmt(lag)
  }
  const stateOf = (p: RunningProcessor) =>
    p.stats.state === 'running' ? '' : ` (${p.stats.state})`
  const head = () => {
    const s = publisher.stats
    return `published ${fmt(s.published)} events, ${fmt(s.duplicates)} duplicates refused, ${fmt(Math.round(sample.rate))}/s`
  }
  const nameWidth = Math.max(...running.map((p) => p.name.length))
  const lines = () => [
    head(),
    ...running.map(
      (p) =>
        `  ${p.name.padEnd(nameWidth)}  applied ${fmt(p.stats.applied)}  refused ${fmt(p.stats.rejected)}  lag ${lagOf(p)}${stateOf(p)}`,
    ),
  ]
  const oneLine = () =>
    [
      head(),
      ...running.map(
        (p) =>
          `${p.name}: applied ${fmt(p.stats.applied)}, refused ${fmt(p.stats.rejected)}, lag ${lagOf(p)}${stateOf(p)}`,
      ),
    ].join(' | ')

  const region: LiveRegion | undefined =
    columnsOf(out) !== undefined ? liveRegion(out, lines) : undefined
  const sampler = startSampler(rt, running, publisher, (next) => {
    sample = next
    if (region) region.refresh()
    else if (Date.now() - lastPrint >= PLAIN_EVERY_MS) {
      out.write(`${oneLine()}\n`)
      lastPrint = Date.now()
    }
  })

  return {
    caughtUp: (signal) => sampler.caughtUp(signal),
    note(text) {
      if (region) region.log(text)
      else out.write(text.endsWith('\n') ? text : `${text}\n`)
    },
    async stop() {
      sample = await sampler.stop()
      if (region) region.stop()
      else out.write(`${oneLine()}\n`)
    },
  }
}

export function fmt(n: number): string {
  return n.toLocaleString('en-US')
}

/** A progress bar with rate and ETA; see {@link progressBar}. */
export interface ProgressBar {
  /** `done` of `total` (undefined while unknown); `note` says what is happening. */
  update(done: number, total: number | undefined, note?: string): void
  /** Prints whole lines above the bar (on a terminal) or between its lines. */
  log(text: string): void
  /** Draws the last state and ends the line. */
  finish(note?: string): void
}

/**
 * A progress bar on stderr (so that `--json` output on stdout stays clean), with the rate over the
 * last seconds and the time left at that rate:
 *
 * ```txt
 * rebuild readings [##########..........]  52%  12,345/23,456 events  8,123/s  ETA 0:03  rebuilding
 * ```
 *
 * On a terminal it is cut to the width and redrawn in place, at most 10 times a second;
 * elsewhere one line every 5 s.
 */
export function progressBar(
  label: string,
  opts: { unit: string; out?: NodeJS.WriteStream } = { unit: 'events' },
): ProgressBar {
  const out = opts.out ?? process.stderr
  const started = Date.now()
  let sample = { at: started, done: 0 }
  let rate: number | undefined
  let state = { done: 0, total: undefined as number | undefined, note: '' }
  let printed = 0

  const line = (width: number | undefined) => {
    const { done, total, note } = state
    const share = total !== undefined && total > 0 ? Math.min(1, done / total) : undefined
    const count = `${fmt(done)}${total !== undefined ? `/${fmt(total)}` : ''} ${opts.unit}`
    const speed = rate === undefined ? '' : `  ${fmt(Math.round(rate))}/s`
    const left =
      rate !== undefined && rate > 0 && total !== undefined && total > done
        ? `  ETA ${duration((total - done) / rate)}`
        : ''
    const percent = share === undefined ? '' : `${String(Math.floor(share * 100)).padStart(3)}%  `
    // The bar keeps its width from frame to frame (narrower on a narrow terminal, gone below 84
    // columns); what does not fit is cut from the end: the note first, then the ETA and rate.
    const barWidth = width === undefined ? 20 : Math.min(20, width - 79)
    const bar =
      share === undefined || barWidth < 5
        ? ''
        : `[${'#'.repeat(Math.round(share * barWidth)).padEnd(barWidth, '.')}] `
    return fit(`${label} ${bar}${percent}${count}${speed}${left}${note ? `  ${note}` : ''}`, width)
  }

  const region =
    columnsOf(out) !== undefined
      ? liveRegion(out, () => [line((columnsOf(out) ?? 80) - 1)])
      : undefined

  const print = (force: boolean) => {
    if (region) region.refresh()
    else if (force || Date.now() - printed >= PLAIN_EVERY_MS) {
      out.write(`${line(undefined)}\n`)
      printed = Date.now()
    }
  }

  return {
    update(done, total, note = '') {
      const now = Date.now()
      if (now - sample.at >= 500) {
        const r = ((done - sample.done) * 1000) / (now - sample.at)
        rate = rate === undefined ? r : 0.7 * rate + 0.3 * r
        sample = { at: now, done }
      } else if (rate === undefined && now - started >= 200 && done > 0) {
        rate = (done * 1000) / (now - started)
      }
      state = { done, total, note }
      print(false)
    },
    log(text) {
      if (region) region.log(text)
      else out.write(text.endsWith('\n') ? text : `${text}\n`)
    },
    finish(note) {
      if (note !== undefined) state = { ...state, note }
      if (region) region.stop()
      else print(true)
    },
  }
}

/** `m:ss` or `h:mm:ss`. */
export function duration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds))
  const h = Math.floor(s / 3600)
  const m = Math.floor((s % 3600) / 60)
  const ss = String(s % 60).padStart(2, '0')
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${ss}` : `${m}:${ss}`
}
