/**
 * The clocks of a fleetstream process: the hybrid logical clock each role stamps its events with,
 * and the clock ticks `run`, `clock` and `start` publish into the stream.
 */
import type { Config } from '../infra/config.ts'
import { runClock } from '../infra/clock-service.ts'
import { createPublisher } from '../infra/publisher.ts'
import { HybridLogicalClock } from '../schemas/hlc.ts'
import type { Runtime } from './runtime.ts'

/** The HLC of one role of this process (`sim`, `cli`, `clock`): node `<role>-<NODE_ID>`. */
export function clockFor(config: Config, role: string): HybridLogicalClock {
  return new HybridLogicalClock({
    node: `${role}-${config.nodeId}`.slice(0, 64),
    maxOffsetMs: config.hlcMaxOffsetMs,
  })
}

/** Ticks into the stream from this process until the signal aborts (deduplicated across processes). */
export function startClock(rt: Runtime, signal: AbortSignal): Promise<void> {
  // Few, short attempts: a tick that NATS is not taking is skipped (the next boundary comes), and
  // a shutdown is not held up by a minute of retries while NATS is away.
  const publisher = createPublisher(rt.js, {
    clock: clockFor(rt.config, 'clock'),
    maxAttempts: 2,
    timeoutMs: 2000,
  })
  return runClock(
    publisher,
    {
      intervalSeconds: rt.config.clockTickSeconds,
      partitions: rt.config.partitions,
      log: rt.log,
    },
    signal,
  )
}
