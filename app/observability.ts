/** Metrics, health and readiness of a long-running fleetstream process (`run`, `start`). */
import { jetstreamManager, type JetStreamManager } from '@nats-io/jetstream'
import type { Kysely } from 'kysely'
import type pg from 'pg'
import type { Config } from '../infra/config.ts'
import { createKysely, createPool } from '../infra/database.ts'
import type { Logger } from '../infra/logger.ts'
import {
  startMetricsServer,
  type CheckResult,
  type MetricsServer,
  type Readiness,
} from '../infra/metrics-server.ts'
import { errorSummary } from '../infra/retry.ts'
import type { ProcessorName } from '../processors/processor-registry.ts'
import { createMetrics, type LagSample, type Metrics } from '../processors/metrics.ts'
import type { Database } from '../projections/tables.ts'
import { within } from '../infra/sleep.ts'
import {
  processorRefs,
  readCheckpoints,
  readNatsFigures,
  type ConsumerFigures,
  type NatsFigures,
  StreamMissingError,
  type ProcessorRef,
} from './fleet-state.ts'
import type { Runtime } from './runtime.ts'

/**
 * Metrics, health and readiness of a `run` or `start` process, served on METRICS_PORT from
 * start-up on: while NATS or Postgres are still awaited the process is alive and not ready.
 *
 * ```ts
 * const obs = await startObservability(config, log, 'fleetstream-run')
 * const rt = await openRuntime(config, log, { name })
 * await obs.attach(rt)
 * startProcessor(spec, { ...rt, metrics: obs.metrics }) // registers itself: ready once running
 * ```
 */
export interface Observability {
  /** For the processors' deps; undefined when METRICS_PORT is off. */
  readonly metrics: Metrics | undefined
  /** Where it listens; undefined when off. */
  readonly url: string | undefined
  /** NATS and Postgres are open: the checks and lag figures can be read. */
  attach(rt: Runtime): Promise<void>
  /** The process is shutting down: not ready any more (still alive). */
  draining(): void
  close(): Promise<void>
}

/** Each check and each part of a lag sample gets this long; a probe never waits longer. */
const CHECK_TIMEOUT_MS = 2000
/**
 * How long a request for the NATS lag figures waits: nats-server 2.9 answers the JetStream API
 * one request at a time, and the info of a partition's consumer costs it ~40 ms of CPU on a
 * 200k-event stream, so a busy server answers late but answers.
 */
const NATS_FIGURES_TIMEOUT_MS = 15_000
/** Readiness probes closer together than this share one round of checks. */
const READY_REUSE_MS = 1000

export async function startObservability(
  config: Config,
  log: Logger,
  name: string,
): Promise<Observability> {
  const { port, host } = config.metrics
  if (port === null) return NO_OBSERVABILITY

  let rt: Runtime | undefined
  let jsm: JetStreamManager | undefined
  let pool: pg.Pool | undefined
  let db: Kysely<Database> | undefined
  let natsConnected = false
  let shuttingDown = false
  const sourceUp: Record<'nats' | 'postgres', boolean | undefined> = {
    nats: undefined,
    postgres: undefined,
  }

  // Of a partitioned processor, the slots this instance owns: their owner reports them, so N
  // instances read each consumer's info once between them, not N times (on nats-server 2.9 the
  // info of a partition's consumer costs ~55 ms of the server's one JetStream API queue).
  const refs = (runtime: Runtime): ProcessorRef[] =>
    metrics.processors.flatMap((p) =>
      processorRefs([runtime.processors[p.name as ProcessorName]], config).filter(
        (r) => config.partitions === 0 || r.name in p.stats.slots,
      ),
    )

  const noteSource = (source: 'nats' | 'postgres', err: unknown) => {
    const up = err === undefined
    if (sourceUp[source] === up) return
    sourceUp[source] = up
    if (up) log.info({ source }, 'lag figures readable again')
    // `start` sets the streams up after the runtime opens: not set up yet is no failure.
    else if (err instanceof StreamMissingError)
      log.info({ source, err: errorSummary(err) }, 'lag figures wait for setup')
    else
      log.warn({ source, err: errorSummary(err) }, 'lag figures not readable; left out of /metrics')
  }

  // One read of the NATS figures at a time. A scrape waits CHECK_TIMEOUT_MS for it, but the
  // server answers the requests anyway, one at a time: a new read every refresh while the last
  // is still queued would grow that queue for ever on a busy server, and every other JetStream
  // request (a slot session's, the watchdog's) would wait behind it.
  let natsRead: Promise<NatsFigures> | undefined
  const readNats = (on: JetStreamManager, ps: readonly ProcessorRef[]): Promise<NatsFigures> =>
    (natsRead ??= readNatsFigures(on, config, ps, delivered()).finally(() => {
      natsRead = undefined
    }))
  // The counts of the consumers that delivered to this instance since the last refresh: the
  // server is asked only for the others (idle, stalled behind Postgres, or just taken over).
  const delivered = () =>
    Object.assign(
      {},
      ...metrics.processors.map((p) => p.deliveries(config.metrics.refreshSeconds * 1000)),
    ) as Record<string, ConsumerFigures>

  const sample = async (): Promise<LagSample> => {
    if (rt === undefined || jsm === undefined || db === undefined) return {}
    const ps = refs(rt)
    const [nats, checkpoints] = await Promise.allSettled([
      within(readNats(jsm, ps), CHECK_TIMEOUT_MS, 'NATS lag figures'),
      within(
        readCheckpoints(
          db,
          ps.map((p) => p.name),
        ),
        CHECK_TIMEOUT_MS,
        'Postgres checkpoints',
      ),
    ])
    noteSource('nats', nats.status === 'rejected' ? nats.reason : undefined)
    noteSource('postgres', checkpoints.status === 'rejected' ? checkpoints.reason : undefined)
    return {
      ...(nats.status === 'fulfilled' ? { nats: nats.value } : {}),
      ...(checkpoints.status === 'fulfilled'
        ? {
            postgres: {
              checkpoints: Object.fromEntries(
                ps.map((p) => [p.name, checkpoints.value[p.name]?.lastSeq ?? 0]),
              ),
            },
          }
        : {}),
    }
  }

  const metrics = createMetrics({ sample, refreshEveryMs: config.metrics.refreshSeconds * 1000 })

  const check = async (what: () => Promise<unknown>): Promise<CheckResult> => {
    try {
      await within(what(), CHECK_TIMEOUT_MS, 'check')
      return { ok: true }
    } catch (err) {
      return { ok: false, detail: errorSummary(err) }
    }
  }

  const ready = async (): Promise<Readiness> => {
    const nc = rt?.nc
    const probe = pool
    const connecting = { ok: false, detail: 'connecting (start-up waits for NATS and Postgres)' }
    const [nats, postgres] = await Promise.all([
      nc === undefined
        ? connecting
        : nc.isClosed()
          ? { ok: false, detail: 'connection closed' }
          : !natsConnected
            ? { ok: false, detail: 'disconnected; reconnecting' }
            : check(() => nc.flush()),
      probe === undefined ? connecting : check(() => probe.query('select 1')),
    ])
    const states = Object.fromEntries(metrics.processors.map((p) => [p.name, p.stats.state]))
    const processors: CheckResult = {
      ok:
        metrics.processors.length > 0 &&
        metrics.processors.every((p) => p.stats.state === 'running'),
      detail: metrics.processors.length > 0 ? states : 'no processor started yet (setting up)',
    }
    const checks: Record<string, CheckResult> = { nats, postgres, processors }
    if (shuttingDown) checks.shutdown = { ok: false, detail: 'shutting down' }
    return { ready: Object.values(checks).every((c) => c.ok), checks }
  }

  // Probes closer together than READY_REUSE_MS share one round of checks: a flood of probes
  // costs NATS and Postgres one ping and one `select 1` a second at most.
  let readiness: { at: number; result: Promise<Readiness> } | undefined
  const readyShared = (): Promise<Readiness> => {
    if (readiness === undefined || performance.now() - readiness.at >= READY_REUSE_MS) {
      readiness = { at: performance.now(), result: ready() }
    }
    return readiness.result
  }

  let server: MetricsServer
  try {
    server = await startMetricsServer({
      port,
      host,
      registry: metrics.registry,
      ready: readyShared,
      log,
    })
  } catch (err) {
    metrics.registry.clear()
    throw err
  }
  log.info(
    { url: server.url, port: server.port },
    `metrics on ${server.url}/metrics, health on /healthz and /readyz`,
  )

  return {
    metrics,
    url: server.url,
    async attach(runtime) {
      rt = runtime
      natsConnected = !runtime.nc.isClosed()
      void (async () => {
        for await (const s of runtime.nc.status()) {
          if (s.type === 'disconnect') natsConnected = false
          else if (s.type === 'reconnect') natsConnected = true
        }
      })()
      // A manager of its own, for the lag figures: one read at a time (readNats), each request
      // waiting up to NATS_FIGURES_TIMEOUT_MS, so a read lost while NATS is away ends in time.
      jsm = await jetstreamManager(runtime.nc, {
        checkAPI: false,
        timeout: NATS_FIGURES_TIMEOUT_MS,
      })
      // Connections of their own: a probe or a scrape never takes one from a processor.
      pool = createPool(config.databaseUrl, {
        max: 2,
        applicationName: `${name}-probe`,
        log,
        connectionTimeoutMs: CHECK_TIMEOUT_MS,
        queryTimeoutMs: CHECK_TIMEOUT_MS,
      })
      db = createKysely<Database>(pool)
      void metrics.refresh()
    },
    draining() {
      shuttingDown = true
      readiness = undefined
    },
    async close() {
      metrics.close()
      await server.close()
      if (pool !== undefined && !pool.ended) await pool.end()
      metrics.registry.clear()
    },
  }
}

/** Nothing served (METRICS_PORT=off, or a command that does not run processors). */
export const NO_OBSERVABILITY: Observability = {
  metrics: undefined,
  url: undefined,
  attach: () => Promise.resolve(),
  draining: () => undefined,
  close: () => Promise.resolve(),
}
