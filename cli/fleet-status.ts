/**
 * What `fleetstream status` reports: stream size and ingest rate, each processor's checkpoint,
 * lag and staleness, DLQ depth and open alerts, and which thresholds are crossed.
 */
import { jetstreamManager, type JetStreamManager } from '@nats-io/jetstream'
import { AuthorizationError, connect, type NatsConnection } from '@nats-io/transport-node'
import type { Kysely } from 'kysely'
import type { Config } from '../infra/config.ts'
import {
  createKysely,
  createPool,
  databaseMissing,
  isLoginRefused,
  isMissingDatabase,
  loginRefused,
} from '../infra/database.ts'
import type { Logger } from '../infra/logger.ts'
import { credentialsRefused, natsConnectOptions } from '../infra/nats.ts'
import { redact } from '../infra/redact.ts'
import { errorSummary, withBackoff } from '../infra/retry.ts'
import { sleep } from '../infra/sleep.ts'
import type { ProcessorSpec } from '../processors/runner/types.ts'
import type { Database } from '../projections/tables.ts'
import {
  processorRefs,
  readCheckpoints,
  readNatsFigures,
  readOpenAlerts,
  streamInfo,
  type ConsumerFigures,
  type NatsFigures,
} from '../app/fleet-state.ts'
import { fmt } from './progress.ts'
import { UnreachableError } from '../app/runtime.ts'

/** Limits that make `status` exit with {@link EXIT_THRESHOLD}; an absent one is not checked. */
export interface Thresholds {
  /** Events a processor may be behind: the larger of its checkpoint gap and its consumer's pending + ack pending. */
  readonly maxLag?: number
  /** Seconds a processor with work to do may go without committing. */
  readonly maxStalenessSeconds?: number
  /** Entries a processor may have in FLEET_DLQ. */
  readonly maxDlq?: number
  /** Percent of FLEET_EVENTS's storage limit (its own or the account's) that may be used. */
  readonly maxStorageUse?: number
}

export interface StatusOptions extends Thresholds {
  /** The processors to report (and check). */
  readonly processors: readonly ProcessorSpec[]
  /** Seconds over which the ingest rate is measured; 0 skips it. */
  readonly windowSeconds: number
  /** How long to keep trying to reach NATS and PostgreSQL. */
  readonly timeoutSeconds: number
  readonly signal?: AbortSignal
}

/** `status` exits with this code when a threshold is crossed (and lists which). */
export const EXIT_THRESHOLD = 3

/** What `status --json` prints. */
export interface StatusReport {
  /** When the figures were read (ISO 8601). */
  readonly at: string
  readonly stream: NatsFigures['stream'] & {
    /** Messages stored per second over the window (deduplicated re-sends do not count). */
    readonly ingestPerSecond: number | null
    readonly rateWindowSeconds: number
  }
  readonly processors: readonly ProcessorStatus[]
  readonly dlq: { readonly total: number; readonly byProcessor: Readonly<Record<string, number>> }
  readonly openAlerts: {
    readonly critical: number
    readonly warning: number
    readonly info: number
    readonly total: number
  }
  readonly thresholds: Thresholds
  /** Thresholds crossed; empty when all is well. */
  readonly breaches: readonly Breach[]
}

export interface ProcessorStatus {
  readonly name: string
  readonly filterSubject: string
  /** FLEET_EVENTS sequence of its checkpoint in Postgres (0: never committed). */
  readonly checkpoint: number
  readonly checkpointHlc: string | null
  readonly checkpointUpdatedAt: string | null
  /** Newest stream sequence its filter matches. */
  readonly lastSeq: number
  /** `lastSeq - checkpoint`: stream sequences it is behind. */
  readonly checkpointLag: number
  /** Its consumer's num_pending and num_ack_pending; null when the consumer does not exist. */
  readonly pending: number | null
  readonly ackPending: number | null
  /**
   * The larger of `checkpointLag` and `pending` plus the unacked deliveries past the checkpoint:
   * what `--max-lag` checks. Unacked deliveries at or below the checkpoint are applied already
   * (their ack was lost, say across a NATS restart, and the server will redeliver them to be acked
   * without work), so they are not lag.
   */
  readonly lag: number
  /** Seconds since its checkpoint last moved (null: never); counts against `--max-staleness` only while `lag > 0`. */
  readonly stalenessSeconds: number | null
  readonly dlqDepth: number
}

export interface Breach {
  readonly check: 'max-lag' | 'max-staleness' | 'max-dlq' | 'max-storage-use'
  /** The processor, or the stream for 'max-storage-use'. */
  readonly processor: string
  /** null: never committed. */
  readonly value: number | null
  readonly limit: number
  readonly message: string
}

/**
 * What the consumer still has to hand over past the checkpoint: its pending messages and those of
 * its unacked deliveries that lie past the checkpoint (at most every sequence between the
 * checkpoint and its newest delivery).
 */
export function consumerLag(consumer: ConsumerFigures | undefined, checkpoint: number): number {
  if (consumer === undefined) return 0
  const unappliedInFlight = Math.min(
    consumer.ackPending,
    Math.max(0, consumer.deliveredSeq - checkpoint),
  )
  return consumer.pending + unappliedInFlight
}

/**
 * Reads the figures an operator (or a monitoring check) asks for: stream size and ingest rate,
 * each processor's checkpoint, lag and staleness, DLQ depth and open alerts, and which thresholds
 * are crossed. Read-only; connects on its own and gives up after `timeoutSeconds`.
 */
export async function fleetStatus(
  config: Config,
  log: Logger,
  o: StatusOptions,
): Promise<StatusReport> {
  const sources = await connectBounded(config, log, o.timeoutSeconds * 1000, o.signal)
  try {
    return await readStatus(sources, config, o)
  } finally {
    await sources.close()
  }
}

async function readStatus(
  { jsm, db }: Sources,
  config: Config,
  o: StatusOptions,
): Promise<StatusReport> {
  const refs = processorRefs(o.processors, config)
  let before: { lastSeq: number; at: number } | undefined
  if (o.windowSeconds > 0) {
    const info = await streamInfo(jsm, config.streams.events)
    before = { lastSeq: info.state.last_seq, at: performance.now() }
    await sleep(o.windowSeconds * 1000, o.signal ?? new AbortController().signal)
  }
  const at = new Date()
  const [nats, checkpoints, alerts] = await Promise.all([
    readNatsFigures(jsm, config, refs),
    readCheckpoints(
      db,
      refs.map((r) => r.name),
    ),
    readOpenAlerts(db),
  ])
  const elapsed = before ? (performance.now() - before.at) / 1000 : 0
  const processors = refs.map((r): ProcessorStatus => {
    const c = checkpoints[r.name]
    const consumer = nats.consumers[r.name]
    const checkpoint = c?.lastSeq ?? 0
    const lastSeq = nats.lastSeq[r.name] ?? 0
    const checkpointLag = Math.max(0, lastSeq - checkpoint)
    return {
      name: r.name,
      filterSubject: r.filterSubject,
      checkpoint,
      checkpointHlc: c?.hlc ?? null,
      checkpointUpdatedAt: c?.updatedAt.toISOString() ?? null,
      lastSeq,
      checkpointLag,
      pending: consumer?.pending ?? null,
      ackPending: consumer?.ackPending ?? null,
      lag: Math.max(checkpointLag, consumerLag(consumer, checkpoint)),
      stalenessSeconds: c === undefined ? null : round(c.ageSeconds, 3),
      dlqDepth: nats.dlq[r.processor] ?? 0,
    }
  })
  const thresholds: Thresholds = {
    ...(o.maxLag !== undefined ? { maxLag: o.maxLag } : {}),
    ...(o.maxStalenessSeconds !== undefined ? { maxStalenessSeconds: o.maxStalenessSeconds } : {}),
    ...(o.maxDlq !== undefined ? { maxDlq: o.maxDlq } : {}),
    ...(o.maxStorageUse !== undefined ? { maxStorageUse: o.maxStorageUse } : {}),
  }
  return {
    at: at.toISOString(),
    stream: {
      ...nats.stream,
      ingestPerSecond:
        before && elapsed > 0 ? round((nats.stream.lastSeq - before.lastSeq) / elapsed, 1) : null,
      rateWindowSeconds: round(elapsed, 3),
    },
    processors,
    dlq: { total: nats.dlqTotal, byProcessor: nats.dlq },
    openAlerts: { ...alerts, total: alerts.critical + alerts.warning + alerts.info },
    thresholds,
    breaches: [...breaches(processors, thresholds), ...storageBreach(nats.stream, thresholds)],
  }
}

function storageBreach(s: NatsFigures['stream'], t: Thresholds): Breach[] {
  const use = s.storageUsePercent
  if (t.maxStorageUse === undefined || use === null || use <= t.maxStorageUse) return []
  return [
    {
      check: 'max-storage-use',
      processor: s.name,
      value: use,
      limit: t.maxStorageUse,
      message: `${s.name}: ${use}% of its storage limit used > --max-storage-use ${t.maxStorageUse} (at 100% every device's event is refused)`,
    },
  ]
}

function breaches(processors: readonly ProcessorStatus[], t: Thresholds): Breach[] {
  const out: Breach[] = []
  for (const p of processors) {
    if (t.maxLag !== undefined && p.lag > t.maxLag) {
      out.push({
        check: 'max-lag',
        processor: p.name,
        value: p.lag,
        limit: t.maxLag,
        message: `${p.name}: lag ${fmt(p.lag)} > --max-lag ${fmt(t.maxLag)} (checkpoint ${fmt(p.checkpointLag)} behind, ${fmt(p.pending ?? 0)} pending, ${fmt(p.ackPending ?? 0)} unacked)`,
      })
    }
    // A processor with nothing to do is never stale, however long ago it last committed.
    const stale = p.stalenessSeconds === null || p.stalenessSeconds > (t.maxStalenessSeconds ?? 0)
    if (t.maxStalenessSeconds !== undefined && p.lag > 0 && stale) {
      out.push({
        check: 'max-staleness',
        processor: p.name,
        value: p.stalenessSeconds,
        limit: t.maxStalenessSeconds,
        message:
          p.stalenessSeconds === null
            ? `${p.name}: ${fmt(p.lag)} to apply and never committed (--max-staleness ${t.maxStalenessSeconds})`
            : `${p.name}: last commit ${p.stalenessSeconds.toFixed(1)} s ago with ${fmt(p.lag)} to apply > --max-staleness ${t.maxStalenessSeconds}`,
      })
    }
    if (t.maxDlq !== undefined && p.dlqDepth > t.maxDlq) {
      out.push({
        check: 'max-dlq',
        processor: p.name,
        value: p.dlqDepth,
        limit: t.maxDlq,
        message: `${p.name}: ${fmt(p.dlqDepth)} in the DLQ > --max-dlq ${fmt(t.maxDlq)}`,
      })
    }
  }
  return out
}

/** The report for a terminal. */
export function formatStatus(r: StatusReport): string {
  const s = r.stream
  const span =
    s.firstAt && s.lastAt
      ? `, stored ${isoSeconds(s.firstAt)} .. ${isoSeconds(s.lastAt)}`
      : ', empty'
  const header = ['processor', 'checkpoint', 'behind', 'pending', 'unacked', 'last commit', 'dlq']
  const rows = r.processors.map((p) => [
    p.name,
    fmt(p.checkpoint),
    fmt(p.checkpointLag),
    p.pending === null ? 'no consumer' : fmt(p.pending),
    p.ackPending === null ? '-' : fmt(p.ackPending),
    p.stalenessSeconds === null ? 'never' : `${age(p.stalenessSeconds)} ago`,
    fmt(p.dlqDepth),
  ])
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i]?.length ?? 0)))
  const line = (cells: readonly string[]) =>
    cells
      .map((c, i) => (i === 0 ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0)))
      .join('  ')
      .trimEnd()
  const per = Object.entries(r.dlq.byProcessor)
    .filter(([, n]) => n > 0)
    .map(([p, n]) => `${p} ${fmt(n)}`)
  const a = r.openAlerts
  return [
    `${s.name}: ${fmt(s.messages)} messages, ${bytes(s.bytes)}${s.storageUsePercent === null ? '' : ` (${s.storageUsePercent}% of its storage limit)`}, sequences ${fmt(s.firstSeq)}..${fmt(s.lastSeq)}${span}`,
    `ingest: ${s.ingestPerSecond === null ? 'not measured (--window 0)' : `${fmt(s.ingestPerSecond)} events/s over ${s.rateWindowSeconds.toFixed(1)} s`}`,
    '',
    line(header),
    ...rows.map(line),
    '',
    `DLQ: ${fmt(r.dlq.total)} parked${per.length ? ` (${per.join(', ')})` : ''}`,
    `open alerts: ${fmt(a.total)} (critical ${fmt(a.critical)}, warning ${fmt(a.warning)}, info ${fmt(a.info)})`,
    ...(r.breaches.length === 0
      ? Object.keys(r.thresholds).length > 0
        ? ['', 'thresholds: ok']
        : []
      : [
          '',
          `thresholds crossed (${r.breaches.length}):`,
          ...r.breaches.map((b) => `  ${b.message}`),
        ]),
  ].join('\n')
}

interface Sources {
  readonly jsm: JetStreamManager
  readonly db: Kysely<Database>
  close(): Promise<void>
}

/**
 * Connects to NATS and PostgreSQL at the same time, trying again with backoff until `timeoutMs`
 * is spent; then gives up naming each one that did not answer and why.
 */
async function connectBounded(
  config: Config,
  log: Logger,
  timeoutMs: number,
  signal?: AbortSignal,
): Promise<Sources> {
  const deadline = Date.now() + timeoutMs
  const left = () => Math.max(1, deadline - Date.now())
  const pool = createPool(config.databaseUrl, {
    max: 2,
    applicationName: 'fleetstream-status',
    log,
    connectionTimeoutMs: Math.min(timeoutMs, 5000),
    queryTimeoutMs: Math.max(timeoutMs, 10_000),
  })
  const [nats, postgres] = await Promise.allSettled([
    untilDeadline(
      log,
      'reach NATS',
      () =>
        connect({
          ...natsConnectOptions(config, 'fleetstream-status'),
          timeout: Math.min(left(), 5000),
        }),
      deadline,
      // Refused credentials: waiting will not help.
      (err) => err instanceof AuthorizationError,
      signal,
    ),
    untilDeadline(
      log,
      'reach PostgreSQL',
      () => pool.query('select 1'),
      deadline,
      // No such database, or refused credentials: waiting will not help.
      (err) => /^(3D000|28)/.test(String((err as { code?: unknown }).code)),
      signal,
    ),
  ])
  if (nats.status === 'rejected' && nats.reason instanceof AuthorizationError) {
    await pool.end()
    throw credentialsRefused(config, nats.reason)
  }
  if (postgres.status === 'rejected' && isLoginRefused(postgres.reason)) {
    if (nats.status === 'fulfilled') await nats.value.close()
    await pool.end()
    throw loginRefused(config.databaseUrl, postgres.reason)
  }
  if (postgres.status === 'rejected' && isMissingDatabase(postgres.reason)) {
    // Not unreachable: the server answered. Like every command but setup (README, "The CLI").
    if (nats.status === 'fulfilled') await nats.value.close()
    await pool.end()
    throw databaseMissing(config.databaseUrl)
  }
  const problems: string[] = []
  if (nats.status === 'rejected') {
    problems.push(`NATS at ${redact(config.natsUrl)}: ${errorSummary(nats.reason)}`)
  }
  if (postgres.status === 'rejected') {
    problems.push(`PostgreSQL at ${redact(config.databaseUrl)}: ${errorSummary(postgres.reason)}`)
  }
  if (problems.length > 0) {
    if (nats.status === 'fulfilled') await nats.value.close()
    await pool.end()
    throw new UnreachableError(
      `cannot reach ${problems.length === 2 ? 'NATS and PostgreSQL' : problems[0]?.startsWith('NATS') ? 'NATS' : 'PostgreSQL'} within ${timeoutMs / 1000} s: ${problems.join('; ')}`,
    )
  }
  const nc = (nats as PromiseFulfilledResult<NatsConnection>).value
  const db = createKysely<Database>(pool)
  return {
    jsm: await jetstreamManager(nc, { checkAPI: false, timeout: Math.max(left(), 5000) }),
    db,
    async close() {
      await nc.close()
      await db.destroy()
      if (!pool.ended) await pool.end()
    },
  }
}

/**
 * Tries `attempt` again with backoff until it succeeds, `isPermanent` says waiting will not help,
 * or the deadline passes; then its last error is thrown.
 */
function untilDeadline<T>(
  log: Logger,
  what: string,
  attempt: () => Promise<T>,
  deadline: number,
  isPermanent: (err: unknown) => boolean,
  signal?: AbortSignal,
): Promise<T> {
  return withBackoff(log, what, { isPermanent, deadline, maxDelayMs: 2000 }).execute(
    attempt,
    signal,
  )
}

function round(n: number, digits: number): number {
  const f = 10 ** digits
  return Math.round(n * f) / f
}

function isoSeconds(d: Date): string {
  return `${d.toISOString().slice(0, 19).replace('T', ' ')}Z`
}

function age(seconds: number): string {
  if (seconds < 60) return `${seconds.toFixed(1)} s`
  if (seconds < 3600) return `${(seconds / 60).toFixed(1)} min`
  if (seconds < 86_400) return `${(seconds / 3600).toFixed(1)} h`
  return `${(seconds / 86_400).toFixed(1)} d`
}

function bytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
  let v = n
  let u = 0
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024
    u++
  }
  return `${u === 0 ? v : v.toFixed(1)} ${units[u] ?? 'B'}`
}
