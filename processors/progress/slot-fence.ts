/**
 * The slot fence: a slot's transactions commit only while this instance's lease still holds the
 * slot's lock (processors/progress/locks.ts).
 */
import {
  CompiledQuery,
  Kysely,
  PostgresAdapter,
  PostgresDriver,
  PostgresIntrospector,
  PostgresQueryCompiler,
  type DatabaseConnection,
  type TransactionSettings,
} from 'kysely'
import type pg from 'pg'
import { CopyConnection } from '../../infra/copy-connection.ts'
import { CheckpointConflictError } from './checkpoints.ts'
import type { Database } from '../../projections/tables.ts'
import { grantedLocks, LEASE_TIMEOUT_MS, SLOT_LOCK_CLASS, sqlLiteral, type Lease } from './locks.ts'

/**
 * The slot's lock is no longer held by the session this instance took it with: the lease ran out
 * (the instance was frozen or cut off) and another instance may own the slot. The transaction
 * rolled back. A {@link CheckpointConflictError}, so a slot session ends on it at once and never
 * takes it for a failure of the events.
 */
export class SlotLostError extends CheckpointConflictError {
  constructor(slotKey: string, pid: number) {
    super(
      slotKey,
      undefined,
      `slot '${slotKey}' is no longer held by this instance's lock session (backend ${pid}): its lease ran out and another instance may own it; rolled back`,
    )
  }
}

/**
 * The database a slot session writes through: `pool`, with every transaction fenced by the
 * lease. Just before `commit` it checks, in the transaction, that the lease's session still holds
 * the slot's lock, and rolls back with {@link SlotLostError} otherwise; and a transaction left
 * idle (its instance frozen or cut off mid-way) is ended by the server after half the lease, so
 * its row locks never hold up the instance that takes the slot over.
 *
 * Its connections also COPY (infra/copy-connection.ts: `copyOf(trx)`), so that a commit can
 * store rows by COPY in its transaction.
 *
 * Between that check and the commit's arrival the lease can still run out; the checkpoint fence
 * (processors/progress/checkpoints.ts) covers that gap: of two commits from one checkpoint, one fails.
 *
 * ```ts
 * const db = fencedDatabase(pool, lease, 'readings-p2')
 * await db.transaction().execute(async (trx) => { ... }) // SlotLostError once the lease is gone
 * ```
 */
export function fencedDatabase(pool: pg.Pool, lease: Lease, slotKey: string): Kysely<Database> {
  return new Kysely<Database>({
    dialect: {
      createAdapter: () => new PostgresAdapter(),
      createDriver: () => new FencedDriver(pool, lease, slotKey),
      createIntrospector: (db) => new PostgresIntrospector(db),
      createQueryCompiler: () => new PostgresQueryCompiler(),
    },
  })
}

/** Raised by the commit's lock check (a user-defined SQLSTATE: class F, not one Postgres uses). */
const SLOT_LOST_SQLSTATE = 'FSL01'

/** Ends a transaction of a slot that sits idle longer than this (set per transaction). */
const IDLE_IN_TRANSACTION = `set local idle_in_transaction_session_timeout = ${LEASE_TIMEOUT_MS / 2}`

class FencedDriver extends PostgresDriver {
  readonly #pool: pg.Pool
  readonly #lease: Lease
  readonly #slotKey: string
  /**
   * The check and the commit, in one round trip: the commit runs only if the check passes. Built
   * by the first commit, which pins the lease's session (its pid and start time).
   */
  #checkAndCommit: CompiledQuery | undefined

  constructor(pool: pg.Pool, lease: Lease, slotKey: string) {
    super({ pool })
    this.#pool = pool
    this.#lease = lease
    this.#slotKey = slotKey
  }

  /**
   * The first commit reads `pg_locks` (a scan of every lock on the server: 0.3-0.5 ms of
   * Postgres CPU) to see that the lease's session holds the slot's lock, and pins that session by
   * its pid and start time. Every commit then checks, without a scan, that the slot's lock is
   * held by a session (a shared try-lock on it fails) and that the pinned session still runs.
   * While it runs, the lock is its own: this instance gives a slot up only once its session has
   * ended, and another instance can take it only once it is free. A lease that ran out ended
   * that session, and a new session never has the old one's start time, even under a reused pid.
   */
  async #fence(connection: DatabaseConnection): Promise<CompiledQuery> {
    if (this.#checkAndCommit !== undefined) return this.#checkAndCommit
    const pid = String(this.#lease.pid)
    const slot = sqlLiteral(this.#slotKey)
    const pinned = await connection.executeQuery<{ started: string }>(
      CompiledQuery.raw(
        `select backend_start::text as started from pg_stat_get_activity(${pid})
          where exists (${grantedLocks(SLOT_LOCK_CLASS)}
            and pid = ${pid} and objid = hashtext(${slot})::oid)`,
      ),
    )
    const started = pinned.rows[0]?.started
    if (started === undefined) throw new SlotLostError(this.#slotKey, this.#lease.pid)
    // The simple query protocol (no parameters) runs both statements in one round trip and stops
    // at the first error, so a failed check leaves the transaction aborted, never committed.
    // Values are literals: integers and quoted names.
    this.#checkAndCommit = CompiledQuery.raw(
      `do $$ begin
         if pg_try_advisory_xact_lock_shared(hashtext(${sqlLiteral(SLOT_LOCK_CLASS)}), hashtext(${slot}))
           or not exists (select from pg_stat_get_activity(${pid})
             where backend_start = ${sqlLiteral(started)}::timestamptz) then
           raise exception 'slot lock lost' using errcode = '${SLOT_LOST_SQLSTATE}';
         end if;
       end $$; commit`,
    )
    return this.#checkAndCommit
  }

  override async acquireConnection(): Promise<DatabaseConnection> {
    return new CopyConnection(await this.#pool.connect())
  }

  override releaseConnection(connection: DatabaseConnection): Promise<void> {
    if (connection instanceof CopyConnection) connection.release()
    return Promise.resolve()
  }

  override async beginTransaction(
    connection: DatabaseConnection,
    settings: TransactionSettings,
  ): Promise<void> {
    if (settings.isolationLevel !== undefined || settings.accessMode !== undefined) {
      await super.beginTransaction(connection, settings)
      await connection.executeQuery(CompiledQuery.raw(IDLE_IN_TRANSACTION))
      return
    }
    // One round trip: the simple query protocol runs both.
    await connection.executeQuery(CompiledQuery.raw(`begin; ${IDLE_IN_TRANSACTION}`))
  }

  override async commitTransaction(connection: DatabaseConnection): Promise<void> {
    try {
      await connection.executeQuery(await this.#fence(connection))
    } catch (err) {
      if ((err as { code?: unknown }).code === SLOT_LOST_SQLSTATE) {
        throw new SlotLostError(this.#slotKey, this.#lease.pid)
      }
      throw err
    }
  }

  /** The pool is shared with the rest of the process: never ended from here. */
  override destroy(): Promise<void> {
    return Promise.resolve()
  }
}
