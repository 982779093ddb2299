import { JetStreamApiCodes, JetStreamApiError, type JetStreamManager } from '@nats-io/jetstream'
import type pg from 'pg'
import type { Config } from '../infra/config.ts'
import { EVENTS_SUBJECT_PREFIX, eventsFilter } from '../schemas/subjects.ts'
import type { ProcessorSpec } from './processor.ts'

/**
 * What one instance owns at a time: the whole stream of a processor (not partitioned), or one
 * partition of it. Its key names the durable consumer, the checkpoint row and the lock.
 *
 * | partitions | slots of `readings`                                 | of `sensor-status`                          |
 * |------------|-----------------------------------------------------|---------------------------------------------|
 * | 0          | `readings`: filter `fleet.events.>`                 | `sensor-status`: `fleet.events.>`           |
 * | 4          | `readings-p0` … `readings-p3`: `fleet.events.0.>` … | `sensor-status-p0` …: `fleet.events.0.>` …  |
 *
 * Every consumer reads the whole stream (or partition), whatever kinds its processor handles: an
 * event put back from the DLQ arrives on a longer subject (`<subject>.redrive.<processor>`) that a
 * kind filter such as `fleet.events.*.reading` would not match, and nats-server 2.9 allows one
 * filter per consumer. `decide()` skips the kinds a processor does not read.
 */
export interface Slot {
  /** Durable consumer name, checkpoint key and lock key. */
  readonly key: string
  /** The processor it belongs to (the DLQ and the metrics name the processor). */
  readonly processor: string
  /** `undefined` when the stream is not partitioned. */
  readonly partition: number | undefined
  readonly filterSubject: string
}

/** The slots of a processor, in partition order (one when the stream is not partitioned). */
export function slotsOf(spec: ProcessorSpec, config: Pick<Config, 'partitions'>): Slot[] {
  if (config.partitions === 0) {
    return [
      {
        key: spec.name,
        processor: spec.name,
        partition: undefined,
        filterSubject: processorFilter(spec, config),
      },
    ]
  }
  return Array.from({ length: config.partitions }, (_, p) => ({
    key: `${spec.name}-p${p}`,
    processor: spec.name,
    partition: p,
    filterSubject: eventsFilter('all', p),
  }))
}

/**
 * Every subject the processor's consumers read, across all its partitions (rebuild, replay,
 * metrics): the whole stream, see {@link Slot}.
 */
export function processorFilter(_spec: ProcessorSpec, config: Pick<Config, 'partitions'>): string {
  return eventsFilter('all', config.partitions === 0 ? undefined : '*')
}

/** The advisory lock a slot's owner holds (`pg_locks` shows it as classid/objid). */
export const SLOT_LOCK_CLASS = 'fleetstream-processor'
/** Instances of a processor announce themselves with a lock of this class and their index. */
const MEMBER_LOCK_CLASS = 'fleetstream-member'
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
/** How often an instance looks at who else is running, to take or give up slots. */
export const REBALANCE_MS = 2_000

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
 * `commit`, that this session still holds the slot's lock (processors/slot-fence.ts), and the
 * checkpoint moves only from where it was (projections/checkpoints.ts).
 *
 * Slots are shared out by rank: with M live instances, the one of rank r (by index) should own
 * the slots whose position modulo M is r. An instance gives up a slot it should no longer own
 * (after its batch in hand) and takes one it should own as soon as the lock is free.
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

  private constructor(
    client: pg.PoolClient,
    pid: number,
    renewedAt: number,
    processor: string,
    onLost: (err: Error) => void,
  ) {
    this.#client = client
    this.pid = pid
    this.#renewedAt = renewedAt
    this.#processor = processor
    this.#onLost = onLost
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
   * `onLost` is called once, when it breaks or goes silent.
   */
  static async open(
    pool: pg.Pool,
    processor: string,
    onLost: (err: Error) => void,
  ): Promise<Lease> {
    const client = await pool.connect()
    try {
      const sent = performance.now()
      const r = await client.query<{ pid: number }>(
        `select pg_backend_pid() as pid, set_config('idle_session_timeout', $1, false)`,
        [String(LEASE_TIMEOUT_MS)],
      )
      return new Lease(client, r.rows[0]?.pid ?? 0, sent, processor, onLost)
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
      )
      if (r.rows[0]?.ok === true) {
        this.#member = i
        return true
      }
    }
    return false
  }

  /** The indexes of the live instances of this processor (this one included), ascending. */
  async members(): Promise<number[]> {
    const r = await this.#query<{ i: number }>(
      `select objid::int as i from pg_locks
        where locktype = 'advisory' and granted and objsubid = 2
          and database = (select oid from pg_database where datname = current_database())
          and classid = hashtext($1)::oid
        order by 1`,
      [this.#memberClass],
    )
    return r.rows.map((row) => row.i)
  }

  /** Which of `slots` this instance should own, given the live instances. */
  async share<T>(slots: readonly T[]): Promise<Set<T>> {
    const me = this.#member
    if (me === undefined) return new Set()
    const members = await this.members()
    const rank = Math.max(0, members.indexOf(me))
    const count = Math.max(1, members.length)
    return new Set(slots.filter((_, i) => i % count === rank))
  }

  /** Takes the slot's lock if no other instance holds it. */
  async tryAcquire(slotKey: string): Promise<boolean> {
    const r = await this.#query<{ ok: boolean }>(
      'select pg_try_advisory_lock(hashtext($1), hashtext($2)) as ok',
      [SLOT_LOCK_CLASS, slotKey],
    )
    return r.rows[0]?.ok === true
  }

  async release(slotKey: string): Promise<void> {
    if (this.lost || this.#closed) return
    await this.#query('select pg_advisory_unlock(hashtext($1), hashtext($2))', [
      SLOT_LOCK_CLASS,
      slotKey,
    ])
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
      await this.#client.query('select pg_advisory_unlock_all()').catch((err: unknown) => {
        this.lost ??= err instanceof Error ? err : new Error(String(err))
      })
    }
    this.#client.release(this.lost ?? true)
    this.#client.off('error', this.#onError)
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
export class LeaseExpiredError extends Error {
  override readonly name = 'LeaseExpiredError'

  constructor(silentMs: number) {
    super(
      `no answer on the session holding the processor locks for ${Math.round(silentMs)} ms (lease ${LEASE_TIMEOUT_MS} ms): the server ends it and its locks, so they count as lost`,
    )
  }
}

/** FLEET_EVENTS is laid out otherwise than FLEET_PARTITIONS says: nothing would read some events. */
export class PartitionLayoutError extends Error {
  override readonly name = 'PartitionLayoutError'
}

/**
 * Checks that the stream's subjects have the layout `partitions` implies, so that a mismatch
 * between FLEET_PARTITIONS and the server's subject mapping stops set-up with a clear error
 * instead of leaving events that no consumer's filter matches. Looks at the newest message of
 * each wrong shape (`last_by_subj` with wildcards, which nats-server 2.9 serves).
 *
 * Throws for what no device can cause (their permissions allow only one shape); returns as a
 * warning what one could: an event in a partition beyond the count, published straight into it,
 * which looks the same as a mapping with more partitions than FLEET_PARTITIONS says.
 */
export async function checkPartitionLayout(
  jsm: JetStreamManager,
  stream: string,
  partitions: number,
): Promise<string[]> {
  const wrong = partitions === 0 ? `${EVENTS_SUBJECT_PREFIX}.*.*.*` : `${EVENTS_SUBJECT_PREFIX}.*.*`
  const m = await lastMessage(jsm, stream, wrong)
  if (m !== undefined) {
    throw new PartitionLayoutError(
      partitions === 0
        ? `${stream} holds partitioned subjects but 'FLEET_PARTITIONS' is 0: set it to N of the server's mapping {{partition(N,1)}}; e.g. '${m.subject}' at sequence ${m.seq}`
        : `${stream} holds subjects without a partition token but 'FLEET_PARTITIONS' is ${partitions}: the server has no partition mapping (nats.conf), or had none when they were stored; e.g. '${m.subject}' at sequence ${m.seq}`,
    )
  }
  if (partitions === 0) return []
  const beyond = await lastMessage(jsm, stream, `${EVENTS_SUBJECT_PREFIX}.${partitions}.>`)
  return beyond === undefined
    ? []
    : [
        `${stream} holds partition ${partitions} but 'FLEET_PARTITIONS' is ${partitions} (partitions 0 to ${partitions - 1}), so no consumer reads it: 'FLEET_PARTITIONS' must equal N of the server's mapping {{partition(N,1)}}; e.g. '${beyond.subject}' at sequence ${beyond.seq}`,
      ]
}

async function lastMessage(
  jsm: JetStreamManager,
  stream: string,
  filter: string,
): Promise<{ subject: string; seq: number } | undefined> {
  try {
    const m = await jsm.streams.getMessage(stream, { last_by_subj: filter })
    return m === null ? undefined : { subject: m.subject, seq: m.seq }
  } catch (err) {
    if (err instanceof JetStreamApiError && err.code === JetStreamApiCodes.NoMessageFound) {
      return undefined
    }
    throw err
  }
}
