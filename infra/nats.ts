import { connect, type NatsConnection } from '@nats-io/transport-node'
import { withBackoff } from './retry.ts'
import type { Logger } from './logger.ts'

/**
 * Connects to NATS, waiting with backoff until a server answers (start-up never assumes NATS is
 * already up), then reconnects forever on its own.
 *
 * ```ts
 * const nc = await connectNats(config.natsUrl, { name: 'fleetstream-readings', log, signal })
 * ```
 */
export async function connectNats(
  url: string,
  opts: { name: string; log: Logger; signal?: AbortSignal },
): Promise<NatsConnection> {
  const nc = await withBackoff(opts.log, `connect to NATS at ${redact(url)}`).execute(
    () =>
      connect({
        servers: url.split(','),
        name: opts.name,
        // Async stack traces on every request halve publish throughput; errors still say what failed.
        noAsyncTraces: true,
        maxReconnectAttempts: -1,
        reconnectTimeWait: 1000,
        reconnectJitter: 500,
        timeout: 5000,
      }),
    opts.signal,
  )
  void watchStatus(nc, opts.log)
  return nc
}

async function watchStatus(nc: NatsConnection, log: Logger): Promise<void> {
  for await (const s of nc.status()) {
    switch (s.type) {
      case 'disconnect':
        log.warn({ server: s.server }, 'NATS disconnected; reconnecting')
        break
      case 'reconnect':
        log.info({ server: s.server }, 'NATS reconnected')
        break
      case 'error':
        log.error({ err: s.error.message }, 'NATS connection error')
        break
      default:
        break
    }
  }
}

/** Hides credentials in a URL for logs. */
export function redact(url: string): string {
  return url.replace(/\/\/[^@/]*@/, '//***@')
}
