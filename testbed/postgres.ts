/**
 * A throwaway PostgreSQL cluster for the tests and the bench: `initdb` into a temp dir, started
 * on a random port with fsync off, one database per test file or bench phase. As root it runs as
 * the `postgres` user, as initdb requires.
 */
import { execFileSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { rmSync } from 'node:fs'
import { chown, mkdtemp, readdir, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import pg from 'pg'
import {
  HarnessError,
  type RunResult,
  findOnPath,
  freePort,
  isExecutable,
  onFreePorts,
  run,
  tailFile,
} from './processes.ts'
import { onProcessEnd } from './reaper.ts'

/**
 * A throwaway PostgreSQL cluster on a random port of 127.0.0.1, trust auth, user `postgres`,
 * tuned for tests (fsync off). Its unix socket lives in its temp dir, never in /var/run.
 *
 * @example
 * const pgc = await startPostgres()
 * const url = await pgc.createDatabase() // postgres://postgres@127.0.0.1:<port>/t_1a2b3c4d
 * await pgc.stop('immediate') // crash it
 * await pgc.start() // same port, same data
 * await pgc.cleanup()
 */
export interface PgCluster {
  readonly port: number
  readonly host: '127.0.0.1'
  readonly dataDir: string
  /** The server log (`pg_ctl -l`); its tail is in every error this cluster throws. */
  readonly logFile: string
  /** `postgres://postgres@127.0.0.1:<port>/<database>`; database defaults to `postgres`. */
  url(database?: string): string
  /** Creates a database (default name `t_<8 hex>`) and returns its URL. */
  createDatabase(name?: string): Promise<string>
  /** `pg_ctl stop -m <mode>`; mode defaults to `fast`. */
  stop(mode?: 'fast' | 'immediate'): Promise<void>
  /** Starts again on the same port with the same data. */
  start(): Promise<void>
  /** Stops it if running, then removes its temp dir. */
  cleanup(): Promise<void>
}

export const PG_BINARIES_NOT_FOUND =
  "PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin or on PATH: install them with 'apt-get install postgresql' (or run 'bash .ci/run')"

const PG_LIB_DIR = '/usr/lib/postgresql'
const INITDB_TIMEOUT_MS = 60_000
const PG_CTL_TIMEOUT_S = 30
const DATABASE_NAME = /^[a-z_][a-z0-9_]{0,62}$/

/** Creates a fresh cluster in a temp dir and starts it; see {@link PgCluster}. */
export async function startPostgres(): Promise<PgCluster> {
  const bin = await findPgBinaries()
  const runAs = await postgresUser()
  const dir = await mkdtemp(join(tmpdir(), 'fleetstream-pg-'))
  const cluster = new PgClusterImpl(bin, runAs, dir)
  try {
    if (runAs !== undefined) await chown(dir, runAs.uid, runAs.gid)
    await cluster.init()
    await cluster.startOnFreePort()
  } catch (err) {
    await cluster.cleanup().catch(() => undefined)
    throw err
  }
  return cluster
}

/** `postgres://postgres@127.0.0.1:<port>/<database>` */
export function pgUrl(port: number, database = 'postgres'): string {
  return `postgres://postgres@127.0.0.1:${port}/${encodeURIComponent(database)}`
}

/** Creates a database on the cluster listening on `port` and returns its URL. */
export async function createDatabase(
  port: number,
  name = `t_${randomBytes(4).toString('hex')}`,
): Promise<string> {
  if (!DATABASE_NAME.test(name)) {
    throw new HarnessError(`database name must match ${String(DATABASE_NAME)}, got '${name}'`)
  }
  const client = new pg.Client({ connectionString: pgUrl(port) })
  await client.connect()
  try {
    await client.query(`CREATE DATABASE "${name}"`)
  } finally {
    await client.end()
  }
  return pgUrl(port, name)
}

interface PgBinaries {
  readonly initdb: string
  readonly pgCtl: string
}

/** Who runs initdb and postgres: undefined means "us"; as root it must be the postgres user. */
type RunAs = { readonly uid: number; readonly gid: number; readonly runuser: string } | undefined

class PgClusterImpl implements PgCluster {
  readonly host = '127.0.0.1'
  readonly dataDir: string
  readonly logFile: string
  port = -1
  private readonly forgetReaper: () => void

  constructor(
    private readonly bin: PgBinaries,
    private readonly runAs: RunAs,
    private readonly dir: string,
  ) {
    this.dataDir = join(dir, 'data')
    this.logFile = join(dir, 'postgres.log')
    // pg_ctl detaches postgres from us: nothing else stops it if this process dies first.
    this.forgetReaper = onProcessEnd(() => {
      const stop = ['stop', '-D', this.dataDir, '-m', 'immediate']
      const [file, args] = this.command(this.bin.pgCtl, stop)
      try {
        execFileSync(file, args, { cwd: dir, stdio: 'ignore', timeout: 10_000 })
      } finally {
        rmSync(dir, { recursive: true, force: true, maxRetries: 3 })
      }
    })
  }

  url(database?: string): string {
    return pgUrl(this.port, database)
  }

  createDatabase(name?: string): Promise<string> {
    return createDatabase(this.port, name)
  }

  async init(): Promise<void> {
    const args = ['-D', this.dataDir, '-A', 'trust', '-U', 'postgres', '--no-sync', '-E', 'UTF8']
    const withLocale = await this.pg(this.bin.initdb, [...args, '--locale=C.UTF-8'])
    if (withLocale.code === 0) return
    await rm(this.dataDir, { recursive: true, force: true })
    const noLocale = await this.pg(this.bin.initdb, [...args, '--no-locale'])
    if (noLocale.code === 0) return
    throw new HarnessError(
      `initdb failed with --locale=C.UTF-8 (exit ${withLocale.code}):\n${withLocale.output}\n` +
        `and with --no-locale (exit ${noLocale.code}):\n${noLocale.output}`,
    )
  }

  /** On a free port, picked again when it was taken before postgres bound it. */
  async startOnFreePort(): Promise<void> {
    await onFreePorts(async () => {
      this.port = await freePort()
      await this.start()
    })
  }

  async start(): Promise<void> {
    const result = await this.pgCtlStart()
    if (result.code !== 0)
      throw await this.failure(`pg_ctl start on port ${this.port} failed`, result)
  }

  async stop(mode: 'fast' | 'immediate' = 'fast'): Promise<void> {
    const args = ['stop', '-w', '-t', String(PG_CTL_TIMEOUT_S), '-D', this.dataDir, '-m', mode]
    const result = await this.pg(this.bin.pgCtl, args)
    if (result.code !== 0) throw await this.failure(`pg_ctl stop -m ${mode} failed`, result)
  }

  async cleanup(): Promise<void> {
    // pg_ctl status exits 0 while a postmaster runs, 3 when none does (4: no data dir).
    const status = await this.pg(this.bin.pgCtl, ['status', '-D', this.dataDir])
    if (status.code === 0) await this.stop('immediate')
    await rm(this.dir, { recursive: true, force: true })
    this.forgetReaper()
  }

  private pgCtlStart(): Promise<RunResult> {
    const options = [
      `-p ${this.port}`,
      // pg_ctl hands -o to /bin/sh: quote the path.
      `-k '${this.dir}'`,
      '-c listen_addresses=127.0.0.1',
      // Nothing is flushed to disk, but every commit is written out before it is acknowledged,
      // as on a production server: a test that crashes Postgres (stop -m immediate) must not lose
      // commits the processors were told of (with synchronous_commit off it lost the last ones,
      // which were applied again after the restart: exact rows, but counts that disagree).
      '-c fsync=off',
      '-c full_page_writes=off',
      '-c max_connections=200',
    ].join(' ')
    const args = ['start', '-w', '-t', String(PG_CTL_TIMEOUT_S), '-D', this.dataDir]
    return this.pg(this.bin.pgCtl, [...args, '-o', options, '-l', this.logFile])
  }

  private async failure(what: string, result: RunResult): Promise<HarnessError> {
    return new HarnessError(
      `${what} (exit ${result.code}): ${result.output}\n` +
        `tail of ${this.logFile}:\n${await tailFile(this.logFile)}`,
    )
  }

  /** Runs a PostgreSQL binary, as the postgres user when we are root. */
  private pg(file: string, args: readonly string[]): Promise<RunResult> {
    const [command, commandArgs] = this.command(file, args)
    return run(command, commandArgs, { cwd: this.dir, timeoutMs: INITDB_TIMEOUT_MS })
  }

  private command(file: string, args: readonly string[]): [string, readonly string[]] {
    if (this.runAs === undefined) return [file, args]
    return [this.runAs.runuser, ['-u', 'postgres', '--', file, ...args]]
  }
}

/** initdb and pg_ctl from the newest /usr/lib/postgresql/<version>/bin, else from PATH. */
async function findPgBinaries(): Promise<PgBinaries> {
  let versions: string[] = []
  try {
    versions = (await readdir(PG_LIB_DIR)).filter((v) => /^\d+(\.\d+)?$/.test(v))
  } catch {
    // No Debian-style layout: PATH is the only place left.
  }
  versions.sort((a, b) => Number(b) - Number(a))
  for (const version of versions) {
    const dir = join(PG_LIB_DIR, version, 'bin')
    const bin = { initdb: join(dir, 'initdb'), pgCtl: join(dir, 'pg_ctl') }
    if ((await isExecutable(bin.initdb)) && (await isExecutable(bin.pgCtl))) return bin
  }
  const initdb = await findOnPath('initdb')
  const pgCtl = await findOnPath('pg_ctl')
  if (initdb !== undefined && pgCtl !== undefined) return { initdb, pgCtl }
  throw new HarnessError(PG_BINARIES_NOT_FOUND)
}

/** PostgreSQL refuses to run as root: as root, find the postgres user and runuser. */
async function postgresUser(): Promise<RunAs> {
  if (process.getuid?.() !== 0) return undefined
  const runuser = await findOnPath('runuser')
  if (runuser === undefined) {
    throw new HarnessError(
      "running as root, PostgreSQL must run as the 'postgres' user, but runuser is not on PATH: install it with 'apt-get install util-linux'",
    )
  }
  const uid = await run('id', ['-u', 'postgres'], { cwd: '/', timeoutMs: 5_000 })
  const gid = await run('id', ['-g', 'postgres'], { cwd: '/', timeoutMs: 5_000 })
  if (uid.code !== 0 || gid.code !== 0) {
    throw new HarnessError(
      `running as root, PostgreSQL must run as the 'postgres' user, but there is none (id -u postgres: ${uid.output}): ` +
        "create it with 'useradd --system --user-group postgres' (apt-get install postgresql creates it)",
    )
  }
  return { uid: Number(uid.output), gid: Number(gid.output), runuser }
}
