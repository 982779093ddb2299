import { jetstreamManager } from '@nats-io/jetstream'
import { AuthorizationError, connect, type NatsConnection } from '@nats-io/transport-node'
import { ConfigError } from './config.ts'
import { isJetStreamUnavailable, isPermissionViolation } from './failures.ts'
import { errorSummary, withBackoff } from './retry.ts'
import { sleep } from './sleep.ts'
import type { Logger } from './logger.ts'

/**
 * Connects to NATS, waiting with backoff until a server answers (start-up never assumes NATS is
 * already up), then reconnects forever on its own.
 *
 * ```ts
 * const nc = await connectNats(config.natsUrl, {
 *   name: 'fleetstream-readings', log, signal, auth: config.natsAuth, inboxPrefix: config.natsInboxPrefix,
 * })
 * ```
 *
 * A server that refuses the credentials stops start-up with a {@link ConfigError} (waiting
 * cannot fix a wrong password); one that is not up yet is waited for.
 */
export async function connectNats(
  url: string,
  opts: {
    name: string
    log: Logger
    signal?: AbortSignal
    auth?: { readonly user: string; readonly password: string } | undefined
    inboxPrefix?: string
  },
): Promise<NatsConnection> {
  const who = opts.auth ? ` as '${opts.auth.user}'` : ''
  const nc = await withBackoff(opts.log, `connect to NATS at ${redact(url)}${who}`, {
    isPermanent: (err) => err instanceof AuthorizationError,
  })
    .execute(
      () =>
        connect({
          servers: url.split(','),
          name: opts.name,
          ...(opts.auth ? { user: opts.auth.user, pass: opts.auth.password } : {}),
          ...(opts.inboxPrefix ? { inboxPrefix: opts.inboxPrefix } : {}),
          // Async stack traces on every request halve publish throughput; errors still say what failed.
          noAsyncTraces: true,
          maxReconnectAttempts: -1,
          reconnectTimeWait: 1000,
          reconnectJitter: 500,
          timeout: 5000,
        }),
      opts.signal,
    )
    .catch((err: unknown) => {
      if (!(err instanceof AuthorizationError)) throw err
      throw new ConfigError(
        [
          opts.auth
            ? `'NATS_USER' '${opts.auth.user}' with 'NATS_PASSWORD' was refused by NATS at ${redact(url)}: ${err.message}`
            : `'NATS_USER' is required by NATS at ${redact(url)} (it refuses anonymous clients: ${err.message}), got nothing`,
        ],
        'configuration',
        { cause: err },
      )
    })
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

/**
 * Moves the connection to another server when the one it is on cannot serve JetStream: a node
 * that restarted may answer every JetStream request with "temporarily unavailable" for minutes
 * while the rest of the cluster works (seen in the chaos suite on nats-server 2.9). Probes every
 * `everyMs`; after `patienceMs` of such answers in a row it forces a reconnect, and the client
 * picks another server from its list.
 */
export async function keepJetStreamReachable(
  nc: NatsConnection,
  opts: { log: Logger; signal: AbortSignal; everyMs?: number; patienceMs?: number },
): Promise<void> {
  const every = opts.everyMs ?? 5000
  const patience = opts.patienceMs ?? 15_000
  const jsm = await jetstreamManager(nc, { checkAPI: false })
  let failingSince: number | undefined
  const stopped = () => opts.signal.aborted || nc.isClosed()
  while (!stopped()) {
    await sleep(every, opts.signal)
    if (stopped()) return
    try {
      await jsm.getAccountInfo()
      failingSince = undefined
    } catch (err) {
      if (isPermissionViolation(err)) {
        // A role without $JS.API.INFO (the device role): nothing to probe with.
        opts.log.debug({ err: errorSummary(err) }, 'JetStream probe not permitted; not probing')
        return
      }
      if (!isJetStreamUnavailable(err)) continue // e.g. disconnected: the client is on it already
      failingSince ??= Date.now()
      if (Date.now() - failingSince >= patience) {
        opts.log.warn(
          { server: nc.getServer(), err: errorSummary(err) },
          'JetStream unavailable on this server; moving to another',
        )
        failingSince = undefined
        await nc.reconnect().catch(() => undefined)
      }
    }
  }
}
