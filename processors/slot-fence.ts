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
import { CheckpointConflictError } from '../projections/checkpoints.ts'
import type { Database } from '../projections/tables.ts'
import { LEASE_TIMEOUT_MS, SLOT_LOCK_CLASS, type Lease } from './partitions.ts'

/**
 * The slot's lock is no longer held by the session this instance took it with: the lease ran out
 * (the instance was frozen or cut off) and another instance may own the slot. The transaction
 * rolled back. A {@link CheckpointConflictError}, so a slot session ends on it at once and never
 * takes it for a failure of the events.
 */
export class SlotLostError extends CheckpointConflictError {
  override readonly name = 'SlotLostError'

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
 * Between that check and the commit's arrival the lease can still run out; the checkpoint fence
 * (projections/checkpoints.ts) covers that gap: of two commits from one checkpoint, one fails.
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

/** Ends a transaction of a slot that sits idle longer than this (set per transaction). */
const IDLE_IN_TRANSACTION = `set local idle_in_transaction_session_timeout = ${LEASE_TIMEOUT_MS / 2}`

class FencedDriver extends PostgresDriver {
  readonly #lease: Lease
  readonly #slotKey: string
  readonly #check: CompiledQuery

  constructor(pool: pg.Pool, lease: Lease, slotKey: string) {
    super({ pool })
    this.#lease = lease
    this.#slotKey = slotKey
    this.#check = CompiledQuery.raw(
      `select exists (
         select from pg_locks
          where locktype = 'advisory' and granted and objsubid = 2 and pid = $1
            and database = (select oid from pg_database where datname = current_database())
            and classid = hashtext($2)::oid and objid = hashtext($3)::oid) as held`,
      [lease.pid, SLOT_LOCK_CLASS, slotKey],
    )
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
    const r = await connection.executeQuery<{ held: boolean }>(this.#check)
    if (r.rows[0]?.held !== true) throw new SlotLostError(this.#slotKey, this.#lease.pid)
    await super.commitTransaction(connection)
  }

  /** The pool is shared with the rest of the process: never ended from here. */
  override destroy(): Promise<void> {
    return Promise.resolve()
  }
}
