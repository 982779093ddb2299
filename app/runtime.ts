/**
 * How a fleetstream process is assembled: its connections to NATS and PostgreSQL (opened with
 * backoff, bounded for one-shot commands) and the idempotent set-up every run starts with.
 */
import { TransientError } from '../schemas/errors.ts'
import {
  jetstream,
  jetstreamManager,
  type JetStreamClient,
  type JetStreamManager,
} from '@nats-io/jetstream'
import type { NatsConnection } from '@nats-io/transport-node'
import { sql, type Kysely, type MigrationResultSet } from 'kysely'
import type pg from 'pg'
import type { Config } from '../infra/config.ts'
import {
  createKysely,
  createPool,
  DatabaseMissingError,
  ensureDatabase,
  isMissingDatabase,
  waitForPostgres,
} from '../infra/database.ts'
import { ConfigError } from '../infra/config.ts'
import { redact } from '../infra/redact.ts'
import type { Logger } from '../infra/logger.ts'
import { connectNats, keepJetStreamReachable, natsServers } from '../infra/nats.ts'
import { errorSummary, withBackoff } from '../infra/retry.ts'
import { within } from '../infra/sleep.ts'
import { isTransient } from '../infra/failures.ts'
import { ensureStreams, type EnsureResult } from '../infra/streams.ts'
import { checkPartitionLayout, slotsOf } from '../processors/partitions.ts'
import { consumerSpecOf } from '../processors/runner/consumer.ts'
import { type ProcessorSpec } from '../processors/runner/types.ts'
import { ensureConsumer } from '../processors/runner/consumer.ts'
import {
  loadProcessors,
  PROCESSOR_NAMES,
  type ProcessorName,
} from '../processors/processor-registry.ts'
import { readCheckpoint } from '../processors/progress/checkpoints.ts'
import { migrateToLatest, migrations } from '../projections/migrate.ts'
import type { Database } from '../projections/tables.ts'

/** NATS or PostgreSQL did not answer within the time given. */
export class UnreachableError extends TransientError {}

/** Open connections of one fleetstream process. */
export interface Runtime {
  readonly config: Config
  readonly log: Logger
  readonly nc: NatsConnection
  readonly js: JetStreamClient
  readonly jsm: JetStreamManager
  readonly pool: pg.Pool
  readonly db: Kysely<Database>
  /**
   * The processors as configured: those the process was opened for (all by default; the alert
   * rules file is read and validated on opening when alerts is among them).
   */
  readonly processors: Readonly<Record<ProcessorName, ProcessorSpec>>
  close(): Promise<void>
}

/** What a command connects to, and how long it waits for it. */
export interface OpenOptions {
  readonly name: string
  readonly signal?: AbortSignal
  readonly poolSize?: number
  /** Connect to NATS (default true); without it, `nc`, `js` and `jsm` throw when used. */
  readonly nats?: boolean
  /** Connect to Postgres (default true); without it, `pool` and `db` throw when used. */
  readonly postgres?: boolean
  /**
   * Create the database if it is missing (default true: `setup`, `run`, `clock`, `start`);
   * otherwise a missing database is a {@link DatabaseMissingError}.
   */
  readonly createDatabase?: boolean
  /**
   * Give up after this long waiting for a dependency (one-shot commands), with an
   * {@link UnreachableError} naming it and its last error; default: wait until the signal aborts.
   */
  readonly timeoutMs?: number
  /**
   * The processors this process uses (default: all). Only these are built: `run readings` does
   * not read the alert rules file nor load what the alerts processor alone needs.
   */
  readonly processors?: readonly ProcessorName[]
}

/**
 * Connects to NATS and Postgres (those the command uses), waiting with backoff for each
 * (start-up never assumes they are up; one-shot commands give up after `timeoutMs`), creating the
 * database if it is missing and `createDatabase` allows. Refused credentials stop at once with a
 * ConfigError.
 */
export async function openRuntime(
  config: Config,
  log: Logger,
  opts: OpenOptions,
): Promise<Runtime> {
  const usesNats = opts.nats ?? true
  const usesPostgres = opts.postgres ?? true
  const deadline = opts.timeoutMs !== undefined ? Date.now() + opts.timeoutMs : undefined
  const seconds = (opts.timeoutMs ?? 0) / 1000
  /** Past the deadline, the last error of a dependency becomes "cannot reach it within N s". */
  const bounded = <T>(what: string, at: string, attempt: Promise<T>): Promise<T> =>
    attempt.catch((err: unknown) => {
      if (
        deadline !== undefined &&
        Date.now() >= deadline &&
        !opts.signal?.aborted &&
        !(err instanceof ConfigError) &&
        !(err instanceof DatabaseMissingError)
      ) {
        throw new UnreachableError(
          `cannot reach ${what} at ${redact(at)} within ${seconds} s: ${errorSummary(err)}`,
          { cause: err },
        )
      }
      throw err
    })
  const connectTimeout =
    deadline === undefined
      ? {}
      : { connectionTimeoutMs: Math.min(5000, Math.max(500, opts.timeoutMs ?? 0)) }
  const pool = usesPostgres
    ? createPool(config.databaseUrl, {
        // Each processor holds one connection for its locks and uses one for the transactions of
        // each slot it may own (one, or one per partition); the outbox relay and set-up need one
        // each.
        max: opts.poolSize ?? PROCESSOR_NAMES.length * (1 + Math.max(1, config.partitions)) + 2,
        applicationName: opts.name,
        log,
        ...connectTimeout,
      })
    : undefined
  // NATS and PostgreSQL are waited for at the same time, and the pool's first connection is the
  // probe: a process that finds its database there (every start but the first) opens one
  // connection to Postgres, not two, before its first batch. When one fails, the wait for the
  // other ends too.
  const giveUp = new AbortController()
  const signal = opts.signal ? AbortSignal.any([opts.signal, giveUp.signal]) : giveUp.signal
  const postgresReady = pool ? waitForDatabase(pool) : Promise.resolve()
  const natsReady = usesNats
    ? bounded(
        'NATS',
        config.natsUrl,
        connectNats(config, { name: opts.name, log, signal, deadline }),
      )
    : Promise.resolve(undefined)
  async function waitForDatabase(p: pg.Pool): Promise<void> {
    const ready = () =>
      bounded(
        'PostgreSQL',
        config.databaseUrl,
        waitForPostgres(p, log, signal, {
          url: config.databaseUrl,
          ...(deadline !== undefined ? { deadline } : {}),
        }),
      )
    try {
      await ready()
    } catch (err) {
      if (!isMissingDatabase(err)) throw err
      await bounded(
        'PostgreSQL',
        config.databaseUrl,
        ensureDatabase(config.databaseUrl, log, signal, {
          create: opts.createDatabase ?? true,
          ...(deadline !== undefined ? { deadline } : {}),
          ...connectTimeout,
        }),
      )
      await ready()
    }
  }
  // The processors' specs load while the connections open (for alerts: importing its code and
  // parsing the rules file, ~0.1 s of CPU, overlaps the round trips). A rules file that fails
  // to load fails at once, and the waits for NATS and Postgres are given up.
  const processorsReady = loadProcessors(config, opts.processors)
  processorsReady.catch(() => undefined)
  try {
    const [nc, , processors] = await Promise.all([natsReady, postgresReady, processorsReady])
    const db = pool ? createKysely<Database>(pool) : undefined
    const closing = new AbortController()
    const watchdog = nc
      ? keepJetStreamReachable(nc, {
          log,
          signal: closing.signal,
          servers: natsServers(config),
        })
      : undefined
    const js = nc ? jetstream(nc) : undefined
    // No API check here: the first real call is inside set-up's retries.
    const jsm = nc ? await jetstreamManager(nc, { checkAPI: false }) : undefined
    const unused = (what: string): never => {
      throw new Error(`${opts.name} does not connect to ${what}`)
    }
    return {
      config,
      log,
      get nc() {
        return nc ?? unused('NATS')
      },
      get js() {
        return js ?? unused('NATS')
      },
      get jsm() {
        return jsm ?? unused('NATS')
      },
      get pool() {
        return pool ?? unused('PostgreSQL')
      },
      get db() {
        return db ?? unused('PostgreSQL')
      },
      processors,
      async close() {
        closing.abort()
        await watchdog
        if (nc) {
          // Drain flushes what is in flight. With the server unreachable it fails at once or
          // waits for a reconnect forever: give it a few seconds, then close (which stops
          // reconnecting).
          await within(nc.drain(), 5000, 'NATS drain').catch(() => undefined)
          if (!nc.isClosed()) await nc.close().catch(() => undefined)
        }
        await db?.destroy()
        // Kysely ends the pool only if it ever ran a query; the pool is ours to end either way.
        if (pool && !pool.ended) await pool.end()
      },
    }
  } catch (err) {
    giveUp.abort()
    await Promise.all([
      natsReady.then((c) => c?.close()).catch(() => undefined),
      postgresReady.catch(() => undefined),
    ])
    await pool?.end().catch(() => undefined)
    throw err
  }
}

export interface SetupReport {
  readonly migrations: readonly string[]
  readonly streams: Record<string, EnsureResult>
  readonly consumers: Record<string, 'created' | 'exists'>
}

/**
 * Everything a run needs, idempotent: the FLEET_EVENTS, FLEET_DLQ and FLEET_NOTIFICATIONS
 * streams (a conflicting existing stream stops set-up with every difference listed), schema
 * migrations, and a durable consumer per processor. A NATS server that is still starting is
 * waited for, and so is a missing stream when this user may not create it (the processor role
 * waits for the admin's `fleetstream setup`). A user that may not look at the streams at all
 * (the device role) gets the permission error. With a `deadline` (epoch ms), the waiting ends
 * then and the last error is thrown (a one-shot command's `--timeout`).
 */
export async function setUp(
  rt: Runtime,
  signal?: AbortSignal,
  opts: {
    deadline?: number
    /**
     * Whether to create the processors' durable consumers (default true). `run` skips them: each
     * slot session anchors its own consumer at its checkpoint before it reads, and looking up
     * the consumers of processors this process does not run is start-up time spent for nothing.
     */
    consumers?: boolean
    /**
     * How the stream's subject layout is checked against FLEET_PARTITIONS (default `scan`, every
     * message; `newest`, its newest event alone: see checkPartitionLayout). `run` checks the
     * newest: the scan costs the server 0.26-0.42 CPU-s per process on a 1M-event stream, before
     * its first batch, and `setup` has scanned already.
     */
    layout?: 'scan' | 'newest'
  } = {},
): Promise<SetupReport> {
  // Every step is idempotent, so a dependency that fails for a moment (a NATS leader being
  // elected, Postgres restarting) is waited out; a conflict or a refusal is an answer: it stops.
  const setUpOnce = async (): Promise<SetupReport> => {
    // Streams first: a user that may not even look at them (the device role) stops here,
    // before touching the database.
    const streams = await ensureStreams(rt.jsm, rt.config.streams)
    // Consumers whose filters miss the stored subjects would read nothing, silently. The check
    // looks for the newest message of a wrong subject shape, which nats-server 2.9 answers by
    // scanning the stream (10-125 ms at 1M events, measured, the longer the busier the server):
    // it runs while the migrations do rather than before them.
    const [layout, migrated] = await Promise.all([
      checkPartitionLayout(rt.jsm, rt.config.streams.events, rt.config.partitions, {
        newestOnly: opts.layout === 'newest',
      }),
      migrateIfBehind(rt.db),
    ])
    for (const warning of layout) rt.log.warn(warning)
    const consumers: Record<string, 'created' | 'exists'> = {}
    for (const spec of opts.consumers === false ? [] : Object.values(rt.processors)) {
      for (const slot of slotsOf(spec, rt.config)) {
        const from = await readCheckpoint(rt.db, slot.key)
        consumers[slot.key] = await ensureConsumer(rt.jsm, consumerSpecOf(slot, rt.config), from)
      }
    }
    return {
      migrations: (migrated.results ?? [])
        .filter((r) => r.status === 'Success')
        .map((r) => r.migrationName),
      streams,
      consumers,
    }
  }
  return withBackoff(rt.log, 'set up', {
    isPermanent: (err) => !isTransient(err),
    ...(opts.deadline !== undefined ? { deadline: opts.deadline } : {}),
  }).execute(setUpOnce, signal)
}

/**
 * {@link migrateToLatest}, after one query that finds the schema up to date (every start of a
 * process but the very first): Kysely's migrator introspects the catalog and takes its lock
 * table in a transaction, 10-30 ms of CPU in the process and more in Postgres, several round
 * trips, and processes starting at once queue on its lock. Only when the applied migrations are
 * exactly the known ones is it skipped; anything else (no table yet, one pending, one this code
 * does not know) goes to the migrator, which migrates or refuses as before.
 */
async function migrateIfBehind(db: Kysely<Database>): Promise<MigrationResultSet> {
  const applied = await sql<{ name: string }>`select name from kysely_migration`.execute(db).then(
    (r) => new Set(r.rows.map((row) => row.name)),
    () => undefined,
  )
  const known = Object.keys(migrations)
  if (applied?.size === known.length && known.every((name) => applied.has(name))) {
    return { results: [] }
  }
  return migrateToLatest(db as Kysely<unknown>)
}
