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
