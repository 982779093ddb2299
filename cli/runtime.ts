import {
  jetstream,
  jetstreamManager,
  type JetStreamClient,
  type JetStreamManager,
} from '@nats-io/jetstream'
import type { NatsConnection } from '@nats-io/transport-node'
import type { Kysely } from 'kysely'
import type pg from 'pg'
import type { Config } from '../infra/config.ts'
import { createKysely, createPool, ensureDatabase, waitForPostgres } from '../infra/database.ts'
import type { Logger } from '../infra/logger.ts'
import { connectNats } from '../infra/nats.ts'
import { withBackoff } from '../infra/retry.ts'
import { isTransient } from '../infra/failures.ts'
import { ensureStreams, type EnsureResult } from '../infra/streams.ts'
import { consumerSpecOf, type ProcessorSpec } from '../processors/processor.ts'
import { ensureConsumer } from '../processors/consumer.ts'
import { loadProcessors, PROCESSOR_NAMES, type ProcessorName } from '../processors/index.ts'
import { readCheckpoint } from '../projections/checkpoints.ts'
import { migrateToLatest } from '../projections/migrate.ts'
import type { Database } from '../projections/tables.ts'

/** Open connections of one fleetstream process. */
export interface Runtime {
  readonly config: Config
  readonly log: Logger
  readonly nc: NatsConnection
  readonly js: JetStreamClient
  readonly jsm: JetStreamManager
  readonly pool: pg.Pool
  readonly db: Kysely<Database>
  /** The processors as configured (the alert rules file is read and validated on opening). */
  readonly processors: Readonly<Record<ProcessorName, ProcessorSpec>>
  close(): Promise<void>
}

/**
 * Connects to NATS and Postgres, waiting with backoff for each (start-up never assumes they are
 * up), creating the database if it is missing.
 */
export async function openRuntime(
  config: Config,
  log: Logger,
  opts: { name: string; signal?: AbortSignal; poolSize?: number },
): Promise<Runtime> {
  const processors = await loadProcessors(config)
  await ensureDatabase(config.databaseUrl, log, opts.signal)
  const pool = createPool(config.databaseUrl, {
    // Each processor holds one connection for its lock and uses one for its transactions; the
    // outbox relay and set-up need one each.
    max: opts.poolSize ?? PROCESSOR_NAMES.length * 2 + 2,
    applicationName: opts.name,
    log,
  })
  try {
    await waitForPostgres(pool, log, opts.signal)
    const nc = await connectNats(config.natsUrl, {
      name: opts.name,
      log,
      ...(opts.signal ? { signal: opts.signal } : {}),
    })
    const db = createKysely<Database>(pool)
    return {
      config,
      log,
      nc,
      js: jetstream(nc),
      // No API check here: the first real call is inside set-up's retries.
      jsm: await jetstreamManager(nc, { checkAPI: false }),
      pool,
      db,
      processors,
      async close() {
        await nc.drain().catch(() => undefined)
        await db.destroy()
        // Kysely ends the pool only if it ever ran a query; the pool is ours to end either way.
        if (!pool.ended) await pool.end()
      },
    }
  } catch (err) {
    await pool.end().catch(() => undefined)
    throw err
  }
}

export interface SetupReport {
  readonly migrations: readonly string[]
  readonly streams: Record<string, EnsureResult>
  readonly consumers: Record<string, 'created' | 'exists'>
}

/**
 * Everything a run needs, idempotent: schema migrations, the FLEET_EVENTS and FLEET_DLQ streams
 * (a conflicting existing stream stops set-up with every difference listed), and a durable
 * consumer per processor. A NATS server that is still starting is waited for.
 */
export async function setUp(rt: Runtime, signal?: AbortSignal): Promise<SetupReport> {
  // Every step is idempotent, so a dependency that fails for a moment (a NATS leader being
  // elected, Postgres restarting) is waited out; a conflict or a refusal is an answer: it stops.
  const setUpOnce = async (): Promise<SetupReport> => {
    const migrated = await migrateToLatest(rt.db as Kysely<unknown>)
    const streams = await ensureStreams(rt.jsm, rt.config.streams)
    const consumers: Record<string, 'created' | 'exists'> = {}
    for (const spec of Object.values(rt.processors)) {
      const from = await readCheckpoint(rt.db, spec.name)
      consumers[spec.name] = await ensureConsumer(rt.jsm, consumerSpecOf(spec, rt.config), from)
    }
    return {
      migrations: (migrated.results ?? [])
        .filter((r) => r.status === 'Success')
        .map((r) => r.migrationName),
      streams,
      consumers,
    }
  }
  return withBackoff(rt.log, 'set up', { isPermanent: (err) => !isTransient(err) }).execute(
    setUpOnce,
    signal,
  )
}
