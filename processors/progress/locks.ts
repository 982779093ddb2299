/**
 * Every advisory lock and lease of the processors, on Postgres: the {@link Lease} an instance holds
 * its membership and slots with, the admin lock that keeps a rebuild and a replay of one
 * processor apart ({@link withAdminLock}), and whether a processor has a running instance
 * ({@link processorRunning}).
 */
import { sql, type Kysely } from 'kysely'
import type pg from 'pg'
import type { Config } from '../../infra/config.ts'
import { TransientError } from '../../schemas/errors.ts'
import type { Database } from '../../projections/tables.ts'
import { slotsOf } from '../partitions.ts'
import type { ProcessorSpec } from '../runner/types.ts'

/** The advisory lock a slot's owner holds (`pg_locks` shows it as classid/objid). */
export const SLOT_LOCK_CLASS = 'fleetstream-processor'
/** Instances of a processor announce themselves with a lock of this class and their index. */
const MEMBER_LOCK_CLASS = 'fleetstream-member'
/** One rebuild or replay of a processor at a time: a lock of this class on the processor's name. */
const ADMIN_LOCK_CLASS = 'fleetstream-admin'
/** More instances of one processor than this wait for an index. */
const MAX_MEMBERS = 64

/**
 * How long an instance keeps its slots once it stops speaking on its lock session: the server ends
 * a lock session silent for this long (`idle_session_timeout`, PostgreSQL 14+), and its locks with
 * it, so a frozen (SIGSTOP, a stalled VM) or cut-off holder's slots go to the others within
 * this plus {@link REBALANCE_MS} plus re-anchoring a consumer. The holder itself counts its slots
 * lost this long after it last sent a query that was answered, whether or not it can reach the
 * server (a partition), so it stops first: the server's clock starts later, at its answer.
 */
export const LEASE_TIMEOUT_MS = 10_000
/** How often an instance speaks on its lock session: several heartbeats fit in the timeout. */
const HEARTBEAT_MS = 2_000
/**
 * How often an instance looks at who else is running, to take or give up slots, when nobody has
 * told it (an instance that died; see {@link Lease}).
 */
export const REBALANCE_MS = 2_000
/** The channel instances `NOTIFY` on when they join, give a slot back or leave (payload: the processor). */
const MEMBERSHIP_CHANNEL = 'fleetstream_membership'

/** The slots the instance of rank `rank` (from 0) owns among `count` live instances. */
export function shareOf<T>(slots: readonly T[], rank: number, count: number): Set<T> {
  return new Set(slots.filter((_, i) => i % count === rank))
}

/**
 * One Postgres session that holds an instance's locks: its membership (an index among the live
 * instances of its processor) and the slots it owns. When the instance dies, Postgres ends the
 * session and every lock goes with it, so another instance can take the slots over.
 *
 * An instance that is alive to Postgres but no longer works (frozen, or on the far side of a
 * partition, where its session would otherwise last until the OS gives up on TCP, ~2 h) must
 * lose its slots too: the session is set to end after {@link LEASE_TIMEOUT_MS} without a query,
 * and a heartbeat speaks every {@link HEARTBEAT_MS}. A lease with an expiry in a table would
 * need the same heartbeat plus a clock to compare; here the server's own timer ends the session
 * and releases the locks, and nothing else has to expire or be cleaned up. A holder that wakes
 * (or is reconnected) after that cannot commit: every transaction of a slot checks, just before
 * `commit`, that this session still holds the slot's lock (processors/progress/slot-fence.ts), and the
 * checkpoint moves only from where it was (processors/progress/checkpoints.ts).
 *
 * Slots are shared out by rank: with M live instances, the one of rank r (by index) should own
 * the slots whose position modulo M is r. An instance gives up a slot it should no longer own
 * (after its batch in hand) and takes one it should own as soon as the lock is free.
 *
 * Instances tell each other when that may be the case: joining, giving a slot back and leaving
 * each send a `NOTIFY` on {@link MEMBERSHIP_CHANNEL}, which every lock session of the processor
 * listens to, so a hand-over waits for the batch in hand and not for the next look round. The
 * look round stays: an instance that dies sends nothing.
 */
export class Lease {
  /** Set when the session broke or went silent too long: nothing is owned any more. */
  lost: Error | undefined
  /** The backend process holding the locks (`pg_locks.pid`). */
  readonly pid: number
  #member: number | undefined
  #closed = false
  /** When the newest query that was answered was sent (`performance.now()`). */
  #renewedAt: number
  /** Queries on the session run one at a time, in order; this settles when the last one has. */
  #queue: Promise<unknown> = Promise.resolve()
  #queued = 0
  /** Rejects when the lease is lost, so a query waiting on a silent socket gives up at once. */
  readonly #lostSignal: Promise<never>
  #rejectLost: (err: Error) => void = () => undefined
  readonly #heartbeat: NodeJS.Timeout
  readonly #client: pg.PoolClient
  readonly #processor: string
  readonly #onLost: (err: Error) => void
  readonly #onError = (err: Error) => {
    this.#lose(err)
  }
  readonly #onNotification: (msg: pg.Notification) => void

  private constructor(
    client: pg.PoolClient,
    pid: number,
    renewedAt: number,
    processor: string,
    onLost: (err: Error) => void,
    onChange: () => void,
  ) {
    this.#client = client
    this.pid = pid
    this.#renewedAt = renewedAt
    this.#processor = processor
    this.#onLost = onLost
    this.#onNotification = (msg) => {
      if (msg.channel === MEMBERSHIP_CHANNEL && msg.payload === processor && msg.processId !== pid)
        onChange()
    }
    client.on('notification', this.#onNotification)
    this.#lostSignal = new Promise<never>((_, reject) => {
      this.#rejectLost = reject
    })
    this.#lostSignal.catch(() => undefined)
    client.on('error', this.#onError)
    this.#heartbeat = setInterval(() => void this.#beat(), HEARTBEAT_MS)
    this.#heartbeat.unref()
  }

  /**
   * A session of its own from `pool`, set to end when silent for {@link LEASE_TIMEOUT_MS};
   * `onLost` is called once, when it breaks or goes silent; `onChange` whenever another instance
   * of the processor joins, gives a slot back or leaves.
   */
  static async open(
    pool: pg.Pool,
    processor: string,
    onLost: (err: Error) => void,
    onChange: () => void = () => undefined,
  ): Promise<Lease> {
    const client = await pool.connect()
    try {
      const sent = performance.now()
      const r = await client.query<{ pid: number }>(
        `select pg_backend_pid() as pid, set_config('idle_session_timeout', $1, false)`,
        [String(LEASE_TIMEOUT_MS)],
      )
      await client.query(`listen ${MEMBERSHIP_CHANNEL}`)
      return new Lease(client, r.rows[0]?.pid ?? 0, sent, processor, onLost, onChange)
    } catch (err) {
      client.release(err instanceof Error ? err : true)
      throw err
    }
  }

  /** This instance's index among its processor's instances, once joined. */
  get member(): number | undefined {
    return this.#member
  }

  /**
   * Takes a free member index above the live ones (wrapping round to the lowest free), so an
   * instance that comes back ranks after those running and stands by rather than taking slots
   * back; `false` when all are taken.
   */
  async join(): Promise<boolean> {
    const live = await this.members()
    const after = live.length === 0 ? 0 : Math.max(...live) + 1
    for (let k = 0; k < MAX_MEMBERS; k++) {
      const i = (after + k) % MAX_MEMBERS
      const r = await this.#query<{ ok: boolean }>(
        'select pg_try_advisory_lock(hashtext($1), $2) as ok',
        [this.#memberClass, i],
      ) // the index itself is the key: members() reads it back
      if (r.rows[0]?.ok === true) {
        this.#member = i
        await this.#announce()
        return true
      }
    }
    return false
  }

  /** The indexes of the live instances of this processor (this one included), ascending. */
  async members(): Promise<number[]> {
    const r = await this.#query<{ i: number }>(
      `select objid::int as i from (${grantedLocks(this.#memberClass)}) l order by 1`,
      [],
    )
    return r.rows.map((row) => row.i)
  }

  /** Which of `slots` this instance should own, given the live instances, and how many live. */
  async share<T>(slots: readonly T[]): Promise<{ mine: Set<T>; instances: number }> {
    const me = this.#member
    if (me === undefined) return { mine: new Set(), instances: 0 }
    const members = await this.members()
    const count = Math.max(1, members.length)
    return { mine: shareOf(slots, Math.max(0, members.indexOf(me)), count), instances: count }
  }

  /** Takes the slot's lock if no other instance holds it. */
  async tryAcquire(slotKey: string): Promise<boolean> {
    const r = await this.#query<{ ok: boolean }>(TRY_LOCK, [SLOT_LOCK_CLASS, slotKey])
    return r.rows[0]?.ok === true
  }

  async release(slotKey: string): Promise<void> {
    if (this.lost || this.#closed) return
    await this.#query(
      `select pg_advisory_unlock(hashtext($1), hashtext($2)), pg_notify('${MEMBERSHIP_CHANNEL}', $3)`,
      [SLOT_LOCK_CLASS, slotKey, this.#processor],
    )
  }

  /**
   * Gives every lock back and closes the session (it was set to time out: it does not go back to
   * the pool). The error listener stays until then: a connection dying meanwhile with no listener
   * would crash the process.
   */
  async close(): Promise<void> {
    if (this.#closed) return
    this.#closed = true
    clearInterval(this.#heartbeat)
    await this.#queue // settles within the lease, answered or not
    if (!this.lost) {
      await this.#client
        .query(`select pg_advisory_unlock_all(), pg_notify('${MEMBERSHIP_CHANNEL}', $1)`, [
          this.#processor,
        ])
        .catch((err: unknown) => {
          this.lost ??= err instanceof Error ? err : new Error(String(err))
        })
    }
    this.#client.release(this.lost ?? true)
    this.#client.off('error', this.#onError)
    this.#client.off('notification', this.#onNotification)
  }

  /** Tells the other instances of the processor to look at their share now. */
  async #announce(): Promise<void> {
    await this.#query(`select pg_notify('${MEMBERSHIP_CHANNEL}', $1)`, [this.#processor])
  }

  get #memberClass(): string {
    return `${MEMBER_LOCK_CLASS}:${this.#processor}`
  }

  /**
   * Speaks on the session so the server keeps it, unless a query is on its way anyway. First
   * checks the clock: after a freeze (the process was stopped longer than the timeout) the
   * server has ended the session already, whatever the socket says yet.
   */
  async #beat(): Promise<void> {
    if (this.lost || this.#closed) return
    const silent = performance.now() - this.#renewedAt
    if (silent > LEASE_TIMEOUT_MS) {
      this.#lose(new LeaseExpiredError(silent))
      return
    }
    if (this.#queued === 0) await this.#query('select 1', []).catch(() => undefined)
  }

  #lose(err: Error): void {
    if (this.lost) return
    this.lost = err
    clearInterval(this.#heartbeat)
    this.#rejectLost(err)
    this.#onLost(err)
  }

  /**
   * A query on the lock session, after those before it. Any failure, or no answer before the
   * lease would run out, loses the lease: the server may have ended the session, and a partition
   * gives no error at all.
   */
  #query<R extends pg.QueryResultRow>(text: string, values: unknown[]): Promise<pg.QueryResult<R>> {
    this.#queued++
    const run = this.#queue.then(() => this.#send<R>(text, values))
    this.#queue = run.catch(() => undefined).finally(() => this.#queued--)
    return run
  }

  async #send<R extends pg.QueryResultRow>(
    text: string,
    values: unknown[],
  ): Promise<pg.QueryResult<R>> {
    if (this.lost)
      throw new Error('the session holding the processor locks was lost', { cause: this.lost })
    const sent = performance.now()
    const answer = this.#client.query<R>(text, values)
    let timer: NodeJS.Timeout | undefined
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => {
          reject(new LeaseExpiredError(performance.now() - this.#renewedAt))
        },
        Math.max(0, this.#renewedAt + LEASE_TIMEOUT_MS - sent),
      )
    })
    try {
      const r = await Promise.race([answer, deadline, this.#lostSignal])
      this.#renewedAt = Math.max(this.#renewedAt, sent)
      return r
    } catch (err) {
      answer.catch(() => undefined) // it may still settle, after the deadline
      const e = err instanceof Error ? err : new Error(String(err))
      this.#lose(e)
      throw e
    } finally {
      clearTimeout(timer)
    }
  }
}

/** The lock session said nothing the server answered for longer than the lease lasts. */
export class LeaseExpiredError extends TransientError {
  constructor(silentMs: number) {
    super(
      `no answer on the session holding the processor locks for ${Math.round(silentMs)} ms (lease ${LEASE_TIMEOUT_MS} ms): the server ends it and its locks, so they count as lost`,
    )
  }
}

/**
 * Runs `fn` holding the processor's admin lock (one rebuild or replay of a processor at a time):
 * a session advisory lock on a connection of its own, released by the server if the process dies.
 */
export async function withAdminLock<T>(
  pool: pg.Pool,
  processor: string,
  what: 'rebuild' | 'replay',
  fn: () => Promise<T>,
): Promise<T> {
  const admin = await pool.connect()
  const lost: { err?: Error } = {}
  const onError = (err: Error) => (lost.err = err)
  admin.on('error', onError)
  try {
    const r = await admin.query<{ ok: boolean }>(TRY_LOCK, [ADMIN_LOCK_CLASS, processor])
    if (r.rows[0]?.ok !== true) {
      throw new AdminLockHeldError(
        `cannot ${what} '${processor}': another rebuild or replay of it is running (it holds the admin lock)`,
      )
    }
    return await fn()
  } finally {
    if (!lost.err) await admin.query('select pg_advisory_unlock_all()').catch(() => undefined)
    admin.release(lost.err)
    admin.off('error', onError)
  }
}

/** Another rebuild or replay of the processor holds its admin lock: try again once it is done. */
export class AdminLockHeldError extends TransientError {}

/** Whether some instance of the processor holds a slot's lock in this database. */
export async function processorRunning(
  db: Kysely<Database>,
  spec: ProcessorSpec,
  config: Pick<Config, 'partitions'>,
): Promise<boolean> {
  const keys = slotsOf(spec, config).map((s) => s.key)
  const r = await sql<{ running: boolean }>`
    select exists (
      ${sql.raw(grantedLocks(SLOT_LOCK_CLASS))}
        and objid in (select hashtext(k)::oid from unnest(${keys}::text[]) as k)
    ) as running`.execute(db)
  return r.rows[0]?.running === true
}

/** Takes the lock of a class ($1) and key ($2), both names, if no session holds it. */
const TRY_LOCK = 'select pg_try_advisory_lock(hashtext($1), hashtext($2)) as ok'

/**
 * The query for the granted locks of `lockClass` in this database (`objid`: the key), to which
 * `and ...` conditions may be appended. The class is a quoted literal, so the text can run where
 * no parameters can (processors/progress/slot-fence.ts runs it in a `do` block).
 */
export function grantedLocks(lockClass: string): string {
  return `select objid from pg_locks
     where locktype = 'advisory' and granted and objsubid = 2
       and database = (select oid from pg_database where datname = current_database())
       and classid = hashtext(${sqlLiteral(lockClass)})::oid`
}

/** A string as an SQL literal. */
export function sqlLiteral(s: string): string {
  return `'${s.replaceAll("'", "''")}'`
}
