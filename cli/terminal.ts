/**
 * What the CLI draws on a terminal: widths, cut lines, a live region that redraws in place (a
 * progress bar, `start`'s status) and logs that go above it instead of through it.
 *
 * ```ts
 * const region = liveRegion(process.stderr, () => [`rebuild readings  ${done}/${total}`])
 * region.log('a line printed above the region\n') // logs written meanwhile do the same
 * region.stop() // draws the last state and leaves it on the screen
 * ```
 */
import { createRequire } from 'node:module'
import type { MultiBar } from 'cli-progress'
import type { DestinationStream } from 'pino'
import type { prettyFactory } from 'pino-pretty'

/**
 * cli-progress and pino-pretty are needed only on a terminal, and loading them costs ~60 ms of a
 * process's start-up: a processor under systemd or docker never draws. Both are CommonJS, so
 * `require` loads them on first use, synchronously.
 */
const lazy = createRequire(import.meta.url)

/** Columns of the terminal `out` writes to; undefined when it is not a terminal (a pipe, a file). */
export function columnsOf(out: NodeJS.WriteStream): number | undefined {
  if (!out.isTTY) return undefined
  return out.columns || Number(process.env.COLUMNS) || 80
}

const graphemes = new Intl.Segmenter('en', { granularity: 'grapheme' })
/** Characters that take two columns (CJK, Hangul, full-width forms, most emoji). */
const WIDE =
  /^[\u1100-\u115F\u2E80-\uA4CF\uAC00-\uD7A3\uF900-\uFAFF\uFE30-\uFE4F\uFF00-\uFF60\uFFE0-\uFFE6\u{1F300}-\u{1FAFF}\u{20000}-\u{3FFFD}]/u

/** Columns `text` takes on a terminal (no control characters in it: see {@link printable}). */
export function widthOf(text: string): number {
  let n = 0
  for (const { segment } of graphemes.segment(text)) n += WIDE.test(segment) ? 2 : 1
  return n
}

/** `text` cut to `width` columns with a trailing `…` (as is without a width). */
export function fit(text: string, width: number | undefined): string {
  if (width === undefined || widthOf(text) <= width) return text
  let out = ''
  let used = 0
  for (const { segment } of graphemes.segment(text)) {
    const w = WIDE.test(segment) ? 2 : 1
    if (used + w > width - 1) break
    out += segment
    used += w
  }
  return width < 1 ? '' : `${out}…`
}

/** `text` padded or cut to exactly `width` columns. */
export function cell(text: string, width: number): string {
  const cut = fit(text, width)
  return cut + ' '.repeat(Math.max(0, width - widthOf(cut)))
}

/** Control characters escaped, so that text from a device or the stream cannot drive the terminal. */
export function printable(s: string): string {
  return s.replace(/\p{Cc}/gu, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`)
}

/** Lines redrawn in place on a terminal until {@link LiveRegion.stop}. */
export interface LiveRegion {
  /** Redraw at the next frame (at most 10 a second). */
  refresh(): void
  /** Print `text` (whole lines) above the region. */
  log(text: string): void
  /** Draw the last state, leave it on the screen and end the line. */
  stop(): void
}

/** The region being drawn, if any: logs go above it (see {@link terminalLogs}). */
let active: LiveRegion | undefined

/**
 * A region of `lines().length` lines (fixed at the start) on the terminal `out`, each cut to the
 * terminal's width at every frame so that a redraw never leaves half lines behind. Drawn with
 * cli-progress's MultiBar (cursor moves, throttling, hidden cursor, lines logged above);
 * the lines are ours. Only for a terminal: see {@link columnsOf}.
 */
export function liveRegion(out: NodeJS.WriteStream, lines: () => string[]): LiveRegion {
  const { MultiBar: Bars } = lazy('cli-progress') as { MultiBar: typeof MultiBar }
  const multi = new Bars({
    stream: out,
    // Our lines are cut to the width; a logged line longer than it may wrap (the terminal's
    // wrapping stays on), since the region is cleared below the cursor before logs are written.
    linewrap: true,
    hideCursor: true,
    fps: 10,
    clearOnComplete: false,
    // The command handles SIGINT itself and stops the region on its way out.
    gracefulExit: false,
    format: (_opts, params, payload: { text?: string }) => fit(payload.text ?? '', params.maxWidth),
  })
  const bars = lines().map((text) => multi.create(1, 0, { text }))
  const refresh = () => {
    const current = lines()
    bars.forEach((bar, i) => {
      bar.update(0, { text: current[i] ?? '' })
    })
  }
  const region: LiveRegion = {
    refresh,
    log(text) {
      // Erase the region from the cursor down first: a logged line shorter than a region line,
      // or one that wraps, leaves nothing of the region behind.
      multi.log(`\x1b[J${text.endsWith('\n') ? text : `${text}\n`}`)
    },
    stop() {
      if (active === region) active = undefined
      refresh()
      // Pending logs are written by an update; stop() alone would drop them.
      ;(multi as unknown as { update(): void }).update()
      multi.stop()
    },
  }
  active = region
  // A second Ctrl-C exits at once (process.exit): the terminal gets its cursor back all the same.
  const showCursor = () => {
    if (active === region) out.write('\x1b[?25h\n')
  }
  process.once('exit', showCursor)
  return region
}

/**
 * Where a command's logs go: on a terminal, pino-pretty's one line per entry (level, time,
 * message, fields), above any live region being drawn; elsewhere undefined, for the JSON lines on
 * stderr that log collectors read.
 */
export function terminalLogs(
  err: NodeJS.WriteStream = process.stderr,
): DestinationStream | undefined {
  if (!err.isTTY || process.env.LOG_FORMAT === 'json') return undefined
  const pretty = (lazy('pino-pretty') as { prettyFactory: typeof prettyFactory }).prettyFactory({
    colorize: !process.env.NO_COLOR,
    singleLine: true,
    translateTime: 'SYS:HH:MM:ss.l',
    ignore: 'pid,hostname',
  })
  return {
    write(line: string) {
      const text = pretty(line)
      if (active) active.log(text)
      else err.write(text)
    },
  }
}
