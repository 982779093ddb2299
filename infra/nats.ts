import { jetstreamManager } from '@nats-io/jetstream'
import {
  AuthorizationError,
  connect,
  type ConnectionOptions,
  type NatsConnection,
} from '@nats-io/transport-node'
import { ConfigError, type Config } from './config.ts'
import { isJetStreamUnavailable, isPermissionViolation } from './failures.ts'
import { redact } from './redact.ts'
import { errorSummary, withBackoff } from './retry.ts'
import { sleep } from './sleep.ts'
import type { Logger } from './logger.ts'

/** What a NATS connection is made of: the servers, who logs in, and the reply subjects' prefix. */
export type NatsSettings = Pick<Config, 'natsUrl' | 'natsAuth' | 'natsInboxPrefix'>

/**
 * The connection options of every fleetstream command that talks to NATS: the servers of
 * NATS_URL, the NATS_USER/NATS_PASSWORD login and the NATS_INBOX_PREFIX of the role. Servers
 * started from nats.conf refuse anonymous clients and let each role subscribe to its own inbox
 * prefix only, so a command connecting without these is refused or never hears a reply.
 *
 * ```ts
 * const nc = await connect({ ...natsConnectOptions(config, 'fleetstream-status'), timeout: 2000 })
 * ```
 */
export function natsConnectOptions(settings: NatsSettings, name: string): ConnectionOptions {
  return {
    servers: natsServers(settings),
    name,
    ...(settings.natsAuth
      ? { user: settings.natsAuth.user, pass: settings.natsAuth.password }
      : {}),
    inboxPrefix: settings.natsInboxPrefix,
    // Async stack traces on every request halve publish throughput; errors still say what failed.
    noAsyncTraces: true,
  }
}

/** The servers of NATS_URL. */
export function natsServers(settings: NatsSettings): string[] {
  return settings.natsUrl.split(',')
}

/**
 * A server refused the login: bad configuration (waiting cannot fix a wrong password), naming
 * the user and the server, never the password.
 */
export function credentialsRefused(settings: NatsSettings, err: AuthorizationError): ConfigError {
  const at = redact(settings.natsUrl)
  return new ConfigError(
    [
      settings.natsAuth
        ? `'NATS_USER' '${settings.natsAuth.user}' with 'NATS_PASSWORD' was refused by NATS at ${at}: ${err.message}`
        : `'NATS_USER' is required by NATS at ${at} (it refuses anonymous clients: ${err.message}), got nothing`,
    ],
    'configuration',
    { cause: err },
  )
}

/**
 * Connects to NATS with {@link natsConnectOptions}, waiting with backoff until a server answers
 * (start-up never assumes NATS is already up), then reconnects forever on its own.
 *
 * ```ts
 * const nc = await connectNats(config, { name: 'fleetstream-readings', log, signal })
 * ```
 *
 * A server that refuses the credentials stops start-up with a {@link ConfigError} (waiting
 * cannot fix a wrong password); one that is not up yet is waited for.
 */
export async function connectNats(
  settings: NatsSettings,
  opts: {
    name: string
    log: Logger
    signal?: AbortSignal | undefined
    /** Give up at this time (epoch ms), throwing the last error; default: wait for ever. */
    deadline?: number | undefined
  },
): Promise<NatsConnection> {
  const who = settings.natsAuth ? ` as '${settings.natsAuth.user}'` : ''
  const { deadline } = opts
  const nc = await withBackoff(opts.log, `connect to NATS at ${redact(settings.natsUrl)}${who}`, {
    isPermanent: (err) => err instanceof AuthorizationError,
    ...(deadline !== undefined ? { deadline } : {}),
  })
    .execute(
      () =>
        connect({
          ...natsConnectOptions(settings, opts.name),
          maxReconnectAttempts: -1,
          reconnectTimeWait: 1000,
          reconnectJitter: 500,
          timeout:
            deadline === undefined ? 5000 : Math.max(500, Math.min(5000, deadline - Date.now())),
        }),
      opts.signal,
    )
    .catch((err: unknown) => {
      if (err instanceof AuthorizationError) throw credentialsRefused(settings, err)
      throw err
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

/**
 * Moves the connection to another server when the one it is on cannot serve JetStream: a node
 * that restarted may answer every JetStream request with "temporarily unavailable" for minutes
 * while the rest of the cluster works (seen in the chaos suite on nats-server 2.9). Probes every
 * `everyMs`; after `patienceMs` of such answers in a row, or one probe unanswered for as long,
 * it forces a reconnect, and the client picks another server from its list.
 *
 * A slow answer is an answer: nats-server 2.9 serves the JetStream API one request at a time,
 * and behind a few partition consumer infos (tens of ms each on a large stream) a probe can wait
 * seconds on a server that works. A reconnect then would drop every pull in flight, and their
 * messages would come back only after the ack wait; the probe waits the whole patience instead.
 * With no other server to go to (`servers` and the cluster's advertised URLs), it never moves.
 */
export async function keepJetStreamReachable(
  nc: NatsConnection,
  opts: {
    log: Logger
    signal: AbortSignal
    /** The servers the connection was given (NATS_URL). */
    servers: readonly string[]
    everyMs?: number
    patienceMs?: number
  },
): Promise<void> {
  const every = opts.everyMs ?? 5000
  const patience = opts.patienceMs ?? 15_000
  const jsm = await jetstreamManager(nc, { checkAPI: false, timeout: patience })
  let failingSince: number | undefined
  const stopped = () => opts.signal.aborted || nc.isClosed()
  while (!stopped()) {
    await sleep(every, opts.signal)
    if (stopped()) return
    const asked = Date.now()
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
      failingSince ??= asked
      if (Date.now() - failingSince < patience) continue
      failingSince = undefined
      if (!hasAnotherServer(nc, opts.servers)) {
        opts.log.warn(
          { server: nc.getServer(), err: errorSummary(err) },
          'JetStream on the only server known has not answered; waiting for it',
        )
        continue
      }
      opts.log.warn(
        { server: nc.getServer(), err: errorSummary(err) },
        'JetStream unavailable on this server; moving to another',
      )
      await nc.reconnect().catch(() => undefined)
    }
  }
}

/** Whether the client knows a server besides the one it is on: given, or advertised by it. */
function hasAnotherServer(nc: NatsConnection, servers: readonly string[]): boolean {
  const hostPort = (u: string) => {
    const at = u
      .trim()
      .replace(/^[a-z]+:\/\//i, '')
      .replace(/^[^@]*@/, '')
      .replace(/\/.*$/, '')
    return /:\d+$/.test(at) ? at : `${at}:4222`
  }
  const known = new Set([...servers, ...(nc.info?.connect_urls ?? [])].map(hostPort))
  known.delete(hostPort(nc.getServer()))
  return known.size > 0
}
