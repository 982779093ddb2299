import { SYSTEM_SOURCE } from '../schemas/envelope.ts'
import type { Logger } from './logger.ts'
import type { Publisher } from './publisher.ts'
import { errorSummary } from './retry.ts'
import { sleep } from './sleep.ts'

export interface ClockServiceOptions {
  readonly intervalSeconds: number
  /**
   * Partitions of FLEET_EVENTS (0: not partitioned). A partitioned stream gets each tick in every
   * partition, as `tick-<boundary ms>-p<partition>`: every partition's consumers need the time.
   */
  readonly partitions?: number
  readonly log: Logger
  /** Wall clock; tests pass their own. */
  readonly now?: () => number
}

/**
 * Publishes a `clock.ticked` event at every interval boundary until the signal aborts, so that
 * time-based logic reads time from the stream. Each tick's eventId is `tick-<boundary ms>` (with
 * `-p<partition>` on a partitioned stream, where each partition gets its own tick): every
 * process may run a clock, and JetStream's dedup stores each tick once. A failed publish is
 * logged and the next boundary tried; time simply stands still in the read models meanwhile.
 *
 * ```ts
 * void runClock(publisher, { intervalSeconds: 10, log }, signal)
 * ```
 */
export async function runClock(
  publisher: Publisher,
  opts: ClockServiceOptions,
  signal: AbortSignal,
): Promise<void> {
  const now = opts.now ?? Date.now
  const step = opts.intervalSeconds * 1000
  for (;;) {
    const boundary = Math.floor(now() / step) * step + step
    await sleep(boundary - now(), signal)
    if (signal.aborted) return
    const at = new Date(boundary).toISOString()
    const partitions = opts.partitions ?? 0
    const targets = partitions === 0 ? [undefined] : Array.from({ length: partitions }, (_, p) => p)
    await Promise.all(
      targets.map(async (partition) => {
        try {
          await publisher.publish(
            {
              type: 'clock.ticked',
              deviceId: SYSTEM_SOURCE,
              eventId:
                partition === undefined ? `tick-${boundary}` : `tick-${boundary}-p${partition}`,
              occurredAt: at,
              data: { at, intervalSeconds: opts.intervalSeconds },
            },
            partition === undefined ? {} : { partition },
          )
        } catch (err) {
          opts.log.warn({ err: errorSummary(err), at, partition }, 'clock tick not published')
        }
      }),
    )
  }
}
