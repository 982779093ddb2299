/** The figures `start` shows while it runs (consumer lags, publish rate), read once a second. */
import type { Publisher } from '../infra/publisher.ts'
import { consumerInfo } from '../processors/runner/consumer.ts'
import type { RunningProcessor } from '../processors/runner/types.ts'
import type { Runtime } from '../app/runtime.ts'

/**
 * What `start` shows while it runs, read once a second: each processor's consumer lag and the
 * publisher's rate. The live status (cli/progress.ts) and `start --json` (cli/start-output.ts)
 * each render it their own way.
 */
export interface StartSample {
  /** Pending + unacked of each processor's consumer; `null` when it could not be read. */
  readonly lags: ReadonlyMap<string, number | null>
  /** Events published per second since the read before. */
  readonly rate: number
}

export interface StartSampler {
  /** Resolves once every processor's consumer has nothing pending (or the signal aborts). */
  caughtUp(signal: AbortSignal): Promise<void>
  /** Stops the ticks, reads once more and hands that last sample back. */
  stop(): Promise<StartSample>
}

/** Reads a sample every second and hands it to `render` (never after `stop`). */
export function startSampler(
  rt: Runtime,
  running: readonly RunningProcessor[],
  publisher: Publisher,
  render: (sample: StartSample) => void,
): StartSampler {
  const lags = new Map<string, number | null>()
  let last = { at: Date.now(), published: 0 }
  let rate = 0
  let stopped = false
  const poll = async (): Promise<StartSample> => {
    for (const p of running) {
      const info = await consumerInfo(rt.jsm, rt.config.streams.events, p.name).catch(
        () => undefined,
      )
      lags.set(p.name, info ? info.num_pending + info.num_ack_pending : null)
    }
    const now = Date.now()
    const published = publisher.stats.published
    rate = ((published - last.published) * 1000) / Math.max(now - last.at, 1)
    last = { at: now, published }
    return { lags, rate }
  }
  const tick = async () => {
    const sample = await poll()
    if (!stopped) render(sample)
  }
  let pending = tick()
  const timer = setInterval(() => {
    pending = pending.then(tick)
  }, 1000)
  return {
    async caughtUp(signal) {
      while (!signal.aborted) {
        await pending
        if (running.every((p) => lags.get(p.name) === 0)) return
        await new Promise((r) => setTimeout(r, 250))
      }
    },
    async stop() {
      clearInterval(timer)
      await pending
      stopped = true
      return poll()
    },
  }
}
