import type { Publisher } from '../infra/publisher.ts'
import { consumerInfo } from '../processors/consumer.ts'
import type { RunningProcessor } from '../processors/processor.ts'
import type { Runtime } from './runtime.ts'

export interface Progress {
  /** Resolves once every processor's consumer has nothing pending (or the signal aborts). */
  caughtUp(signal: AbortSignal): Promise<void>
  stop(): Promise<void>
}

/**
 * A live line for `fleetstream start`: events published, applied, refused and consumer lag.
 * Redrawn in place on a terminal, printed every 5 s otherwise (logs, CI).
 */
export function startProgress(
  rt: Runtime,
  running: readonly RunningProcessor[],
  publisher: Publisher,
): Progress {
  const tty = process.stdout.isTTY
  const lags = new Map<string, number | undefined>()
  let last = { at: Date.now(), published: 0 }
  let rate = 0
  let lastPrint = 0
  let stopped = false

  const poll = async () => {
    for (const p of running) {
      const info = await consumerInfo(rt.jsm, rt.config.streams.events, p.name).catch(
        () => undefined,
      )
      lags.set(p.name, info ? info.num_pending + info.num_ack_pending : undefined)
    }
    const now = Date.now()
    const published = publisher.stats.published
    rate = ((published - last.published) * 1000) / Math.max(now - last.at, 1)
    last = { at: now, published }
  }

  const line = () => {
    const s = publisher.stats
    const procs = running
      .map((p) => {
        const lag = lags.get(p.name)
        return `${p.name}: applied ${fmt(p.stats.applied)}, refused ${fmt(p.stats.rejected)}, lag ${lag === undefined ? '?' : fmt(lag)}${p.stats.state === 'running' ? '' : ` (${p.stats.state})`}`
      })
      .join(' | ')
    return `published ${fmt(s.published)} (dup ${fmt(s.duplicates)}, ${fmt(Math.round(rate))}/s) | ${procs}`
  }

  const tick = async () => {
    await poll()
    if (stopped) return
    if (tty) process.stdout.write(`\r\x1b[K${line()}`)
    else if (Date.now() - lastPrint >= 5000) {
      console.log(line())
      lastPrint = Date.now()
    }
  }
  let pending = tick()
  const timer = setInterval(() => {
    pending = pending.then(tick)
  }, 1000)

  return {
    async caughtUp(signal) {
      while (!signal.aborted) {
        await pending
        const all = running.every((p) => lags.get(p.name) === 0)
        if (all) return
        await new Promise((r) => setTimeout(r, 250))
      }
    },
    async stop() {
      clearInterval(timer)
      await pending
      await poll()
      stopped = true
      if (tty) process.stdout.write(`\r\x1b[K${line()}\n`)
      else console.log(line())
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
  /** Draws the last state and ends the line. */
  finish(note?: string): void
}

/**
 * A progress bar on stderr (so that `--json` output on stdout stays clean), with the rate over the
 * last seconds and the time left at that rate:
 *
 * ```
 * rebuild readings [##########..........]  52%  12,345/23,456 events  8,123/s  ETA 0:03  rebuilding
 * ```
 *
 * Redrawn in place on a terminal (at most 10 times a second); one line every 5 s otherwise.
 */
export function progressBar(
  label: string,
  opts: { unit: string; out?: NodeJS.WriteStream } = { unit: 'events' },
): ProgressBar {
  const out = opts.out ?? process.stderr
  const tty = out.isTTY
  const started = Date.now()
  let sample = { at: started, done: 0 }
  let rate: number | undefined
  let state = { done: 0, total: undefined as number | undefined, note: '' }
  let drawn = 0

  const line = () => {
    const { done, total, note } = state
    const share = total !== undefined && total > 0 ? Math.min(1, done / total) : undefined
    const width = 24
    const bar =
      share === undefined
        ? ''
        : `[${'#'.repeat(Math.round(share * width)).padEnd(width, '.')}] ${String(Math.floor(share * 100)).padStart(3)}%  `
    const count = `${fmt(done)}${total !== undefined ? `/${fmt(total)}` : ''} ${opts.unit}`
    const speed = rate === undefined ? '' : `  ${fmt(Math.round(rate))}/s`
    const left =
      rate !== undefined && rate > 0 && total !== undefined && total > done
        ? `  ETA ${duration((total - done) / rate)}`
        : ''
    return `${label} ${bar}${count}${speed}${left}${note ? `  ${note}` : ''}`
  }

  const draw = (force: boolean) => {
    const now = Date.now()
    if (tty && (force || now - drawn >= 100)) {
      out.write(`\r\x1b[K${line()}`)
      drawn = now
    } else if (!tty && (force || now - drawn >= 5000)) {
      out.write(`${line()}\n`)
      drawn = now
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
      draw(false)
    },
    finish(note) {
      if (note !== undefined) state = { ...state, note }
      draw(true)
      if (tty) out.write('\n')
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
