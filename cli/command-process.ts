/**
 * The process around a command: configuration, logger, connections, and the one SIGINT/SIGTERM
 * handler every command shares. The first signal aborts the command's signal (finish in-flight
 * work, shut down cleanly); a second exits at once with 130, and a command that fails after it
 * was interrupted exits 130 too (see {@link wasInterrupted}).
 */
import { loadConfig, ConfigError } from '../infra/config.ts'
import { EXIT_INTERRUPTED } from './exit-codes.ts'
import { createLogger, type Logger } from '../infra/logger.ts'
import { redact } from '../infra/redact.ts'
import { errorSummary } from '../infra/retry.ts'
import { NO_OBSERVABILITY, startObservability, type Observability } from '../app/observability.ts'
import { openRuntime, UnreachableError, type Runtime } from '../app/runtime.ts'
import { openEventsSource, type EventsSource } from './stored-events.ts'
import { terminalLogs } from './terminal.ts'
import type { ProcessorName } from '../processors/processor-registry.ts'

let interrupted = false

/** Whether SIGINT or SIGTERM came: a command that fails after it exits 130. */
export function wasInterrupted(): boolean {
  return interrupted
}

/**
 * A signal that aborts on the first SIGINT/SIGTERM (after `onStop`); a second one exits at once
 * with 130.
 */
function stopOnSignals(log: Logger, message: string, onStop?: () => void): AbortSignal {
  const stop = new AbortController()
  const onSignal = (sig: NodeJS.Signals) => {
    if (stop.signal.aborted) {
      log.warn({ signal: sig }, 'second signal: exiting now')
      process.exit(EXIT_INTERRUPTED)
    }
    log.info({ signal: sig }, message)
    interrupted = true
    onStop?.()
    stop.abort()
  }
  process.on('SIGINT', onSignal)
  process.on('SIGTERM', onSignal)
  return stop.signal
}

interface RuntimeOptions {
  logLevel?: string
  serve?: boolean
  /** A one-shot command: give up waiting for NATS or PostgreSQL after this long. */
  timeoutSeconds?: number
  /** Connect to NATS (default true). */
  nats?: boolean
  /** Connect to PostgreSQL (default true). */
  postgres?: boolean
  /** Create a missing database (default: the services do, one-shot commands do not). */
  createDatabase?: boolean
  /** The processors the command uses (default: all): only these are loaded. */
  processors?: readonly ProcessorName[]
}

/**
 * Runs a command with open connections and a signal that aborts on the first SIGINT/SIGTERM.
 * With `serve`, metrics, health and readiness are served on METRICS_PORT from before the
 * connections open until the command is done.
 */
export async function withRuntime(
  name: string,
  body: (rt: Runtime, signal: AbortSignal, obs: Observability) => Promise<void>,
  opts: RuntimeOptions = {},
): Promise<void> {
  const config = loadConfig()
  const log = createLogger({
    level: opts.logLevel ?? config.logLevel,
    name,
    destination: terminalLogs(),
  })
  const obs = opts.serve ? await startObservability(config, log, name) : NO_OBSERVABILITY
  const signal = stopOnSignals(log, 'shutting down: finishing the batch in hand', () => {
    obs.draining()
  })
  let rt: Runtime | undefined
  try {
    rt = await openRuntime(config, log, {
      name,
      signal,
      // Services (run, clock, start) create a missing database; one-shot commands but setup do not.
      createDatabase: opts.createDatabase ?? opts.timeoutSeconds === undefined,
      ...(opts.timeoutSeconds !== undefined ? { timeoutMs: opts.timeoutSeconds * 1000 } : {}),
      ...(opts.nats !== undefined ? { nats: opts.nats } : {}),
      ...(opts.postgres !== undefined ? { postgres: opts.postgres } : {}),
      ...(opts.processors !== undefined ? { processors: opts.processors } : {}),
    })
    await obs.attach(rt)
    await body(rt, signal, obs)
  } catch (err) {
    if (signal.aborted && rt === undefined) {
      // A service told to stop before it started has done what it was told; a one-shot command
      // has not: it exits 130.
      if (opts.timeoutSeconds === undefined) return
      throw new Error('interrupted while waiting for NATS or PostgreSQL', { cause: err })
    }
    throw err
  } finally {
    await obs.close()
    await rt?.close()
    log.flush()
  }
}

/**
 * {@link withRuntime} for a one-shot command: it connects to what it uses only, gives up after
 * `--timeout` seconds waiting for it, and exits 130 when interrupted while waiting.
 */
export async function oneShot(
  name: string,
  opts: { timeout: number } & Pick<RuntimeOptions, 'nats' | 'postgres' | 'createDatabase'>,
  body: (rt: Runtime, signal: AbortSignal) => Promise<void>,
): Promise<void> {
  await withRuntime(name, body, {
    timeoutSeconds: opts.timeout,
    ...(opts.nats !== undefined ? { nats: opts.nats } : {}),
    ...(opts.postgres !== undefined ? { postgres: opts.postgres } : {}),
    ...(opts.createDatabase !== undefined ? { createDatabase: opts.createDatabase } : {}),
  })
}

/**
 * Like {@link oneShot} for commands that read NATS only (the `events` commands): they need no
 * database and no processor, so they still work while Postgres is down.
 */
export async function withNats(
  name: string,
  timeoutSeconds: number,
  body: (src: EventsSource, signal: AbortSignal) => Promise<void>,
): Promise<void> {
  const config = loadConfig()
  const log = createLogger({ level: config.logLevel, name, destination: terminalLogs() })
  const signal = stopOnSignals(log, 'stopping')
  let src: Awaited<ReturnType<typeof openEventsSource>> | undefined
  try {
    const deadline = Date.now() + timeoutSeconds * 1000
    src = await openEventsSource(config, log, { name, signal, deadline }).catch((err: unknown) => {
      if (Date.now() < deadline || signal.aborted || err instanceof ConfigError) throw err
      throw new UnreachableError(
        `cannot reach NATS at ${redact(config.natsUrl)} within ${timeoutSeconds} s: ${errorSummary(err)}`,
        { cause: err },
      )
    })
    await body(src, signal)
  } catch (err) {
    if (signal.aborted && src === undefined) {
      throw new Error('interrupted while waiting for NATS', { cause: err })
    }
    throw err
  } finally {
    await src?.close()
    log.flush()
  }
}
