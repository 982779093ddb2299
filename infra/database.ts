import { TransientError } from '../schemas/errors.ts'
import { Kysely, PostgresDialect } from 'kysely'
import pg from 'pg'
import { ConfigError } from './config.ts'
import type { Logger } from './logger.ts'
import { prepareRepeated } from './prepared-statements.ts'
import { redact } from './redact.ts'
import { withBackoff } from './retry.ts'

/**
 * A pg pool for one database. int8 columns (stream sequences, counts) come back as numbers: they
 * stay far below 2^53 here, and numbers are what the rest of the code compares.
 */
export function createPool(
  url: string,
  opts: {
    max?: number
    applicationName?: string
    log: Logger
    /** How long to wait for a connection (default 5 s). */
    connectionTimeoutMs?: number
    /** Fail a query that has no answer after this long (default: wait). */
    queryTimeoutMs?: number
    /** Schemas unqualified names resolve in (e.g. a rebuild's scratch schema); the server's default otherwise. */
    searchPath?: readonly string[]
  },
): pg.Pool {
  const pool = new pg.Pool({
    connectionString: url,
    options: [
      ...SERVER_SIDE_TCP,
      ...(opts.searchPath ? [`-c search_path=${searchPathOption(opts.searchPath)}`] : []),
    ].join(' '),
    // Our side notices a server gone silent (a partition) instead of waiting on a dead socket.
    keepAlive: true,
    keepAliveInitialDelayMillis: 10_000,
    max: opts.max ?? 4,
    application_name: opts.applicationName ?? 'fleetstream',
    connectionTimeoutMillis: opts.connectionTimeoutMs ?? 5000,
    ...(opts.queryTimeoutMs !== undefined ? { query_timeout: opts.queryTimeoutMs } : {}),
    idleTimeoutMillis: 30_000,
    types: numericTypes(),
  })
  // An idle client that loses its server emits here; without a listener Node would crash.
  pool.on('error', (err) => {
    opts.log.warn({ err: err.message }, 'idle Postgres connection lost')
  })
  // pg-pool drops its listener while a client is checked out (e.g. inside a transaction, between
  // two queries): a server going away then would crash the process. Every client keeps one; the
  // query in progress, if any, still fails and is retried as a transient failure.
  pool.on('connect', (client) => {
    // Repeated statements named: Postgres parses and plans them once (prepared-statements.ts).
    prepareRepeated(client)
    client.on('error', (err) => {
      opts.log.warn({ err: err.message }, 'Postgres connection lost')
    })
  })
  return pool
}

/**
 * The server's side of each connection: a client that stops acknowledging (cut off by a partition)
 * is dropped after ~25 s of keepalives when idle, and after 30 s of unacknowledged data while the
 * server sends, so its backend ends and releases what it holds, instead of waiting for the OS
 * TCP timeout (~2 h). A frozen client's kernel still acknowledges: the lock session's own timeout
 * covers that (processors/partitions.ts).
 */
const SERVER_SIDE_TCP = [
  '-c tcp_keepalives_idle=10',
  '-c tcp_keepalives_interval=5',
  '-c tcp_keepalives_count=3',
  '-c tcp_user_timeout=30000',
]

function searchPathOption(schemas: readonly string[]): string {
  for (const s of schemas) {
    if (!/^[a-z_][a-z0-9_]{0,62}$/.test(s))
      throw new Error(`'searchPath' schemas must match /^[a-z_][a-z0-9_]{0,62}$/, got '${s}'`)
  }
  return schemas.join(',')
}

function numericTypes(): pg.TypeOverrides {
  const types = new pg.TypeOverrides()
  types.setTypeParser(pg.types.builtins.INT8, Number)
  types.setTypeParser(pg.types.builtins.NUMERIC, Number)
  return types
}

/** Kysely over a pool the caller owns (the dialect receives its pool). */
export function createKysely<DB>(pool: pg.Pool): Kysely<DB> {
  return new Kysely<DB>({ dialect: new PostgresDialect({ pool }) })
}

/**
 * The database named in DATABASE_URL does not exist and this command does not create it (only
 * `setup`, `run`, `clock` and `start` do): a mistyped name is not silently created.
 */
export class DatabaseMissingError extends TransientError {}

/**
 * Waits with backoff until the server answers a query; until `deadline` (epoch ms) if given, then
 * the last error is thrown. A refused login is a {@link ConfigError} at once.
 */
export async function waitForPostgres(
  pool: pg.Pool,
  log: Logger,
  signal?: AbortSignal,
  opts: { url?: string; deadline?: number } = {},
): Promise<void> {
  await withBackoff(log, 'connect to PostgreSQL', {
    isPermanent: (err) => isLoginRefused(err) || isMissingDatabase(err),
    ...(opts.deadline !== undefined ? { deadline: opts.deadline } : {}),
  })
    .execute(() => pool.query('select 1'), signal)
    .catch((err: unknown) => {
      if (opts.url !== undefined && isLoginRefused(err)) throw loginRefused(opts.url, err)
      throw err
    })
}

/**
 * Waits for the server, then creates the database named in `url` if it does not exist yet (with
 * `create: false`, throws {@link DatabaseMissingError} instead). Only then does it connect to the
 * server's `postgres` database, so a user without access to it is fine wherever the database
 * already exists. Safe to run from several processes at once. A login the server refuses (SQLSTATE
 * class 28: no such role, wrong password, no pg_hba entry) is a {@link ConfigError} at once:
 * waiting cannot fix it. With a `deadline` (epoch ms), an unreachable server's last error is
 * thrown then.
 */
export async function ensureDatabase(
  url: string,
  log: Logger,
  signal?: AbortSignal,
  opts: { create?: boolean; deadline?: number; connectionTimeoutMs?: number } = {},
): Promise<void> {
  const name = decodeURIComponent(new URL(url).pathname.replace(/^\//, ''))
  if (!/^[A-Za-z0-9_-]{1,63}$/.test(name)) {
    throw new Error(
      `'DATABASE_URL' database name must match /^[A-Za-z0-9_-]{1,63}$/, got '${name}'`,
    )
  }
  const probe = createPool(url, {
    max: 1,
    log,
    ...(opts.connectionTimeoutMs !== undefined
      ? { connectionTimeoutMs: opts.connectionTimeoutMs }
      : {}),
  })
  try {
    await waitForPostgres(probe, log, signal, {
      url,
      ...(opts.deadline !== undefined ? { deadline: opts.deadline } : {}),
    })
    return
  } catch (err) {
    if (!isMissingDatabase(err)) throw err
  } finally {
    await probe.end()
  }
  if (opts.create === false) {
    throw databaseMissing(url)
  }
  const admin = new URL(url)
  admin.pathname = '/postgres'
  const client = createPool(admin.toString(), { max: 1, log })
  try {
    await client.query(`create database "${name}"`)
    log.info({ database: name, url: redact(url) }, 'created database')
  } catch (err) {
    if ((err as { code?: string }).code !== '42P04') throw err // 42P04: created meanwhile
  } finally {
    await client.end()
  }
}

/** 3D000: the database named in the connection does not exist. */
/** What every command but setup and the services says of a database that does not exist. */
export function databaseMissing(url: string): DatabaseMissingError {
  const name = decodeURIComponent(new URL(url).pathname.replace(/^\//, ''))
  return new DatabaseMissingError(`no database '${name}' at ${redact(url)} (run setup first)`)
}

/** SQLSTATE 3D000: the server answers, the database is not there. */
export function isMissingDatabase(err: unknown): boolean {
  return (err as { code?: string } | undefined)?.code === '3D000'
}

/** SQLSTATE class 28, invalid authorization: 28P01 wrong password, 28000 no such role or no pg_hba entry. */
export function isLoginRefused(err: unknown): boolean {
  const code = (err as { code?: unknown } | undefined)?.code
  return typeof code === 'string' && code.startsWith('28')
}

export function loginRefused(url: string, err: unknown): ConfigError {
  const user = decodeURIComponent(new URL(url).username) || '(the default user)'
  const message = err instanceof Error ? err.message : String(err)
  const code = (err as { code?: unknown }).code
  return new ConfigError(
    [
      `'DATABASE_URL' user '${user}' was refused by PostgreSQL at ${redact(url)}: ${message} (${String(code)})`,
    ],
    'configuration',
    { cause: err },
  )
}
