/**
 * Rebuilds one processor's projection from stream sequence 1 into scratch tables while the live
 * one keeps serving, then swaps them in (`fleetstream rebuild`).
 */
import { jetstream, type JetStreamClient, type JsMsg } from '@nats-io/jetstream'
import type { MsgHdrs } from '@nats-io/transport-node'
import type { Kysely, Transaction } from 'kysely'
import type pg from 'pg'
import { createKysely, createPool } from '../../infra/database.ts'
import { isTransient } from '../../infra/failures.ts'
import type { Logger } from '../../infra/logger.ts'
import { errorSummary, withBackoff } from '../../infra/retry.ts'
import { sleep } from '../../infra/sleep.ts'
import {
  analyzeScratch,
  deferIndexes,
  discardScratch,
  dropRetired,
  lockLive,
  prepareScratch,
  restoreIndexes,
  retiredSchemaName,
  swapIn,
} from './blue-green.ts'
import { bulkLoadOf } from './bulk-load.ts'
import { onOneConnection } from './copy-in.ts'
import type { CopyIn } from '../../projections/copy-rows.ts'
import {
  advanceCheckpoint,
  readCheckpointSeqs,
  type CheckpointPosition,
} from '../progress/checkpoints.ts'
import type { BulkLoad, ProjectedEvent } from '../../projections/projection.ts'
import type { Database } from '../../projections/tables.ts'
import { decide } from '../decision.ts'
import { parkedEvents, parkedKey } from '../dlq/park.ts'
import { processorFilter, slotsOf, type Slot } from '../partitions.ts'
import type { ProcessorDeps, ProcessorSpec } from '../runner/types.ts'
import { withAdminLock } from '../progress/locks.ts'
import { StreamReader } from '../stream-reader.ts'
import { TransientError } from '../../schemas/errors.ts'

export interface RebuildOptions {
  /**
   * Events per transaction into the new tables (default 20,000: per event, a sensor's row is
   * read and written once per batch it appears in; at 5,000, the alerts rebuild of 200k events
   * cost ~20% more CPU in node and ~45% more in Postgres, sensor-status ~40% more in Postgres).
   */
  readonly batchSize?: number
  /** Try the swap once the new tables are this many stream sequences or fewer behind the live checkpoint (default: the batch size, at most 5000: the swap applies them holding the live tables). */
  readonly swapDistance?: number
  /** How long the swap waits for each live table before it lets the live processor go first and tries again (default 500 ms). */
  readonly lockTimeoutMs?: number
  /** How long the swap may hold the live tables to apply the last events; longer and it tries again later (default 3 s). */
  readonly maxLockedMs?: number
  /** Keep the replaced tables in a `retired_<processor>_<time>` schema (default) or drop them. */
  readonly keepRetired?: boolean
  readonly signal?: AbortSignal
  /** Called after every batch and at each phase. */
  readonly onProgress?: (p: RebuildProgress) => void
}

export interface RebuildProgress {
  readonly phase: 'reading-dlq' | 'preparing' | 'rebuilding' | 'swapping' | 'swapped'
  /** Events applied to the new tables. */
  readonly applied: number
  /** Events refused (bad JSON, schema, subject, clock skew), as the live run refused them. */
  readonly refused: number
  /** Events parked by the live processor, and copies redriven for other processors. */
  readonly skipped: number
  /** Stream sequence the new tables hold. */
  readonly position: number
  /** Events of this processor's subject not read yet, as the server last counted. */
  readonly remaining: number | undefined
  readonly liveCheckpoint: number
}

export interface RebuildResult {
  readonly processor: string
  readonly applied: number
  readonly refused: number
  readonly skipped: number
  /** The live checkpoint at the swap: the new tables hold exactly the events up to it. */
  readonly checkpoint: number
  /** Where the replaced tables are, or null when they were dropped. */
  readonly retired: string | null
  readonly elapsedMs: number
  /** How long the live tables were held by the swap. */
  readonly lockedMs: number
  /** Swap attempts that had to wait for the live processor and were tried again. */
  readonly deferredSwaps: number
}

/** The rebuild cannot go on; nothing has changed in the live tables: starting it again may succeed. */
export class RebuildError extends TransientError {}

/**
 * Blue/green rebuild of one processor's projection from stream sequence 1 while the live
 * projection keeps serving:
 *
 * 1. takes the admin lock of the processor (one rebuild or replay at a time), reads which events
 *    the live processor parked in the DLQ;
 * 2. creates empty copies of its tables in `rebuild_<processor>` (a leftover from a crashed
 *    rebuild is dropped first);
 * 3. reads FLEET_EVENTS with an ordered consumer on the processor's subject, decides each event as
 *    the live processor does ({@link decide}, DLQ-parked events skipped), and applies it through a
 *    connection whose search_path is only the scratch schema, in large batches, with its own
 *    position; it never reads past the live checkpoint. Until the new tables first reach the live
 *    checkpoint they are filled in bulk ({@link bulkLoadOf}), without their non-unique indexes,
 *    which are built once at the end of that phase ({@link deferIndexes});
 * 4. once within `swapDistance` of the live checkpoint, in one transaction: locks the live tables
 *    (waiting for the live processor's batch in flight), reads the live checkpoint, applies the
 *    events up to exactly it, renames the live tables out and the new ones in. The live checkpoint
 *    row is untouched and now describes the new tables; the live processor's next batch, waiting
 *    on the lock, lands in them.
 *
 * Side effects do not repeat: the alerts projection's notifications go to the scratch outbox,
 * which nothing publishes; after the swap the relay recognises every one already sent.
 * On failure or abort the scratch schema is dropped; a crash leaves it for the next rebuild to drop.
 */
export async function rebuildProjection(
  spec: ProcessorSpec,
  deps: ProcessorDeps,
  opts: RebuildOptions = {},
): Promise<RebuildResult> {
  return withAdminLock(deps.pool, spec.name, 'rebuild', async () => {
    const run = new RebuildRun(spec, deps, opts)
    try {
      return await run.run().catch((err: unknown) => {
        // Whatever was in hand when the signal came (a query, a read), the rebuild was interrupted.
        if (opts.signal?.aborted === true && !(err instanceof RebuildError)) {
          throw new RebuildError(
            `rebuild of '${spec.name}' interrupted; the live tables are untouched`,
            { cause: err },
          )
        }
        throw err
      })
    } catch (err) {
      await discardScratch(deps.db, spec.name).catch((e: unknown) => {
        deps.log.warn({ err: errorSummary(e) }, 'could not drop the scratch schema')
      })
      throw err
    }
  })
}

/** What one transaction into the new tables did. */
interface Step {
  readonly to: CheckpointPosition
  readonly applied: number
  readonly refused: number
  readonly skipped: number
}

class RebuildRun {
  readonly #spec: ProcessorSpec
  readonly #deps: ProcessorDeps
  readonly #opts: Required<Omit<RebuildOptions, 'signal' | 'onProgress'>>
  readonly #signal: AbortSignal
  readonly #onProgress: ((p: RebuildProgress) => void) | undefined
  readonly #log: Logger
  readonly #js: JetStreamClient
  readonly #started = performance.now()
  #parked = new Set<string>()
  /** Read off the stream, not yet applied (past the live checkpoint, or held for the swap). */
  #carry: Taken[] = []
  /** Slots with a message in the carry: behind it, their later messages are carried too. */
  #carriedSlots = new Set<string>()
  #pos: CheckpointPosition = { lastSeq: 0, hlc: null }
  /** Every slot's live checkpoint (one per partition on a partitioned stream), as last read. */
  #live = new Map<string, number>()
  readonly #slots: readonly Slot[]
  readonly #slotKeys: ReadonlySet<string>
  #applied = 0
  #refused = 0
  #skipped = 0
  #deferred = 0
  /** Swaps deferred because a live table's lock was not granted in time: each doubles the next wait. */
  #lockTimeouts = 0
  #phase: RebuildProgress['phase'] = 'reading-dlq'
  #reader: StreamReader | undefined
  /** How batches are applied until the new tables first reach the live checkpoints; then undefined. */
  #bulk: BulkLoad | undefined
  /** The scratch indexes dropped for the bulk phase, created again when it ends. */
  #deferredIndexes: string[] = []
  /** The scratch schema's connections (search_path is only the scratch schema). */
  #scratchPool: pg.Pool | undefined

  constructor(spec: ProcessorSpec, deps: ProcessorDeps, opts: RebuildOptions) {
    this.#spec = spec
    this.#deps = deps
    const batchSize = opts.batchSize ?? 20_000
    this.#opts = {
      batchSize,
      swapDistance: opts.swapDistance ?? Math.min(batchSize, 5000),
      lockTimeoutMs: opts.lockTimeoutMs ?? 500,
      maxLockedMs: opts.maxLockedMs ?? 3000,
      keepRetired: opts.keepRetired ?? true,
    }
    this.#signal = opts.signal ?? new AbortController().signal
    this.#onProgress = opts.onProgress
    this.#log = deps.log.child({ rebuild: spec.name })
    this.#slots = slotsOf(spec, deps.config)
    this.#slotKeys = new Set(this.#slots.map((s) => s.key))
    this.#js = jetstream(deps.nc)
  }

  async run(): Promise<RebuildResult> {
    const { config } = this.#deps
    this.#report('reading-dlq')
    this.#parked = await this.#readParked()
    this.#bulk = bulkLoadOf(this.#spec)
    this.#report('preparing')
    const scratch = await prepareScratch(this.#deps.db, this.#spec.name, this.#spec.projection)
    this.#deferredIndexes = await deferIndexes(
      this.#deps.db,
      this.#spec.name,
      this.#spec.projection,
    )
    this.#log.info({ scratch, parked: this.#parked.size }, 'rebuilding into scratch tables')
    // Only the scratch schema: a name the copy lacks fails loudly instead of reaching a live table.
    // Three connections: a batch's transaction, its COPYs aside, and the deferred indexes.
    const pool = createPool(config.databaseUrl, {
      max: 3,
      applicationName: `fleetstream-rebuild-${this.#spec.name}`,
      log: this.#log,
      searchPath: [scratch],
    })
    this.#scratchPool = pool
    const db = createKysely<Database>(pool)
    try {
      this.#reader = await StreamReader.open(
        this.#js,
        config.streams.events,
        processorFilter(this.#spec, config),
        { seq: 1 },
        { bufferSize: READ_BUFFER },
      )
      this.#report('rebuilding')
      return await this.#follow(db)
    } finally {
      await this.#reader?.close()
      await db.destroy()
      if (!pool.ended) await pool.end()
    }
  }

  /** Applies the stream up to the live checkpoints, following them, until the swap succeeds. */
  async #follow(db: Kysely<Database>): Promise<RebuildResult> {
    // While a batch commits, the next is read: commits stay one at a time, in order.
    let committing: Promise<void> | undefined
    for (;;) {
      this.#throwIfAborted()
      this.#live = await this.#readLive()
      const batch = await this.#take(this.#opts.batchSize)
      await committing
      committing = undefined
      if (batch.length > 0) {
        const commit = this.#commitIsolating(db, batch)
        commit.catch(() => undefined) // awaited before the next batch or the swap
        committing = commit
      }
      this.#report('rebuilding')
      if (batch.length === this.#opts.batchSize) continue
      await committing
      committing = undefined
      // Read up to every live checkpoint, or nothing is left to read.
      const reader = this.#reader as StreamReader
      const atLive =
        this.#allSlotsCarried() ||
        reader.lastSeq >= this.#maxLive() ||
        (batch.length === 0 && (await reader.drained()))
      if (!atLive && this.#maxLive() - reader.lastSeq > this.#opts.swapDistance) {
        // The carry is full while some partition's live processor is far behind: wait for it.
        if (batch.length === 0) await sleep(200, this.#signal)
        continue
      }
      await this.#endBulk(db)
      const result = await this.#trySwap(db)
      if (result) return result
      await sleep(200 + Math.random() * 500, this.#signal)
    }
  }

  /** What the live run parked; an abort ends it as an interrupted rebuild. */
  async #readParked(): Promise<Set<string>> {
    try {
      return await parkedEvents(
        this.#js,
        this.#deps.jsm,
        this.#deps.config.streams,
        this.#spec.name,
        this.#signal,
      )
    } catch (err) {
      this.#throwIfAborted()
      throw err
    }
  }

  /** Which slot a message belongs to; undefined for a partition beyond the count, which no live consumer reads. */
  #slotOf(m: JsMsg): string | undefined {
    if (this.#deps.config.partitions === 0) return this.#spec.name
    const key = `${this.#spec.name}-p${m.subject.split('.')[2] ?? ''}`
    return this.#slotKeys.has(key) ? key : undefined
  }

  #maxLive(live: ReadonlyMap<string, number> = this.#live): number {
    return Math.max(0, ...live.values())
  }

  #allSlotsCarried(): boolean {
    return this.#carriedSlots.size === this.#slots.length
  }

  async #readLive(): Promise<Map<string, number>> {
    return readCheckpointSeqs(
      this.#deps.db,
      this.#slots.map((s) => s.key),
    )
  }

  /**
   * Up to `max` messages the live run has applied, in stream order within each slot; what a slot's
   * checkpoint has not reached yet is carried (and so is everything after it in that slot).
   */
  async #take(max: number): Promise<Taken[]> {
    const out: Taken[] = []
    if (this.#carry.length > 0) {
      const keep: Taken[] = []
      for (const c of this.#carry) {
        if (out.length < max && covered(c, this.#live)) out.push(c)
        else keep.push(c)
      }
      this.#setCarry(keep)
      if (out.length >= max) return out
    }
    const reader = this.#reader as StreamReader
    while (out.length < max && this.#carry.length < MAX_CARRY && !this.#allSlotsCarried()) {
      const m = reader.poll() ?? (await reader.next(out.length === 0 ? 250 : 20))
      if (m === undefined) break
      const slot = this.#slotOf(m)
      if (slot === undefined) {
        this.#skipped++
        continue
      }
      const t = this.#decideOne(m, slot)
      if (!this.#carriedSlots.has(slot) && covered(t, this.#live)) out.push(t)
      else this.#carryOn(t)
    }
    return out
  }

  #carryOn(t: Taken): void {
    this.#carry.push(t)
    this.#carriedSlots.add(t.slot)
  }

  #setCarry(carry: Taken[]): void {
    this.#carry = carry
    this.#carriedSlots = new Set(carry.map((c) => c.slot))
  }

  /**
   * Decides a message as soon as it is read, against the DLQ entries known then, and keeps only
   * the decision: the message (its buffer views into the socket's chunks, delivery info and
   * headers) is garbage at once instead of living until its batch commits. Two batches of
   * messages and the client's buffer held ~50,000 of them: a readings rebuild peaked at
   * 350-410 MB RSS, 250-340 MB now (400k events, 3+3 runs).
   *
   * The DLQ is read at the start, and again when the projection fails on an event (then the one
   * event is looked up, {@link #stored}); decisions already taken stand. Before, a batch read
   * while another failed was decided after that second read: an event the live run parked in the
   * meantime, which the projection does not fail on, was skipped there and is applied now, as
   * every such event outside that window always was.
   */
  #decideOne(m: JsMsg, slot: string): Taken {
    const seq = m.info.streamSequence
    // No key to compute when nothing was parked (as usual): two patterns and a header per message.
    if (this.#parked.size > 0 && this.#parked.has(parkedKey(m))) return { seq, slot, event: SKIP }
    const d = decide(m, this.#spec, this.#deps.config)
    return { seq, slot, event: d.kind === 'apply' ? d.event : d.kind === 'refuse' ? REFUSE : SKIP }
  }

  #countAll(taken: readonly Taken[]): {
    events: ProjectedEvent[]
    refused: number
    skipped: number
  } {
    const events: ProjectedEvent[] = []
    let refused = 0
    let skipped = 0
    for (const t of taken) {
      if (t.event === SKIP) skipped++
      else if (t.event === REFUSE) refused++
      else events.push(t.event)
    }
    return { events, refused, skipped }
  }

  /** Projection writes and the scratch position, in the caller's transaction. */
  async #applyIn(
    trx: Transaction<Database>,
    msgs: readonly Taken[],
    bulk?: { readonly load: BulkLoad; readonly copy: CopyIn },
  ): Promise<Step> {
    const { events, refused, skipped } = this.#countAll(msgs)
    let hlc = this.#pos.hlc
    for (const e of events) if (hlc === null || e.event.hlc > hlc) hlc = e.event.hlc
    // The scratch position: the highest sequence applied (slots may be applied out of step).
    let highest = this.#pos.lastSeq
    for (const m of msgs) highest = Math.max(highest, m.seq)
    const to = { lastSeq: highest, hlc }
    if (bulk !== undefined) await bulk.load.apply(trx, events, bulk.copy)
    else await this.#spec.projection.apply(trx, events)
    await advanceCheckpoint(trx, this.#spec.name, this.#deps.config.streams.events, this.#pos, to)
    return { to, applied: events.length, refused, skipped }
  }

  /** One transaction into the new tables; in the bulk phase on one connection, for COPY. */
  async #commit(db: Kysely<Database>, msgs: readonly Taken[]): Promise<Step> {
    const load = this.#bulk
    const pool = this.#scratchPool
    if (load === undefined || pool === undefined) {
      return db.transaction().execute((trx) => this.#applyIn(trx, msgs))
    }
    return onOneConnection(pool, (one, copy) =>
      one.transaction().execute((trx) => this.#applyIn(trx, msgs, { load, copy })),
    )
  }

  /**
   * Ends the bulk phase once the new tables first reach the live checkpoints: what the bulk load
   * left to derive, then the deferred indexes. The swap's tail and every later batch go through
   * the projection's own `apply`, as the live run's do.
   */
  async #endBulk(db: Kysely<Database>): Promise<void> {
    const bulk = this.#bulk
    const pool = this.#scratchPool
    if (bulk === undefined || pool === undefined) return
    // Side by side, on connections of their own: the indexes are sorts of what the bulk load
    // wrote, and its finish (the readings' rollups: seconds at 1M events) mostly reads.
    // Both end before a failure of either is thrown: nothing runs on after the rebuild failed.
    const ended = await Promise.allSettled([
      onOneConnection(pool, (one, copy) =>
        one.transaction().execute((trx) => bulk.finish(trx, copy)),
      ),
      restoreIndexes(db, this.#deferredIndexes),
    ])
    for (const e of ended) if (e.status === 'rejected') throw e.reason
    this.#bulk = undefined
  }

  #advance(r: Step): void {
    this.#pos = r.to
    this.#applied += r.applied
    this.#refused += r.refused
    this.#skipped += r.skipped
  }

  /**
   * Commits a batch (transient failures are retried). When the projection fails on it, halves are
   * committed on their own down to the one event that fails: skipped if the live processor parked
   * it meanwhile, otherwise the rebuild stops naming it (the live run applied it).
   */
  async #commitIsolating(db: Kysely<Database>, msgs: readonly Taken[]): Promise<void> {
    if (this.#bulk?.holdsState === true) {
      // The bulk load has taken these events into memory: they cannot be given to it again.
      try {
        this.#advance(await this.#commit(db, msgs))
        return
      } catch (err) {
        if (this.#signal.aborted) throw err
        throw new RebuildError(
          `the rebuild's bulk load of '${this.#spec.name}' failed (start the rebuild again): ${errorSummary(err)}`,
          { cause: err },
        )
      }
    }
    try {
      const r = await withBackoff(this.#log, 'rebuild batch', {
        maxAttempts: 6,
        isPermanent: (err) => !isTransient(err),
      }).execute(() => this.#commit(db, msgs), this.#signal)
      this.#advance(r)
      return
    } catch (err) {
      if (isTransient(err) || this.#signal.aborted) throw err
      if (msgs.length > 1) {
        const mid = Math.ceil(msgs.length / 2)
        await this.#commitIsolating(db, msgs.slice(0, mid))
        await this.#commitIsolating(db, msgs.slice(mid))
        return
      }
      const [{ seq }] = msgs as [Taken]
      this.#parked = await this.#readParked()
      const stored = await this.#stored(seq)
      if (this.#parked.has(stored.key)) {
        this.#skipped++
        return
      }
      throw new RebuildError(
        `the projection failed on stream sequence ${seq} (${stored.subject}), which the live run applied: ${errorSummary(err)}`,
        { cause: err },
      )
    }
  }

  /**
   * The DLQ key and subject of the message at `seq`, read back from the stream (a {@link Taken}
   * keeps neither: this is needed only for an event the projection failed on).
   */
  async #stored(seq: number): Promise<{ key: string; subject: string }> {
    const stream = this.#deps.config.streams.events
    const sm = await this.#deps.jsm.streams.getMessage(stream, { seq }).catch(() => null)
    const info = { stream, streamSequence: seq }
    if (sm === null) return { key: parkedKey({ info }), subject: '?' }
    // A getter: a stored message parses its header block when it is read, and a malformed one
    // (a device's) throws there, inside parkedKey, which reads it as no headers.
    const msg: { readonly headers: MsgHdrs | undefined; readonly info: typeof info } = {
      get headers() {
        return sm.header
      },
      info,
    }
    return { key: parkedKey(msg), subject: sm.subject }
  }

  /**
   * The swap, in one transaction of the scratch connection. Returns undefined when it has to wait
   * for the live processor (a lock not granted in time, or too many events to apply while holding
   * the live tables): nothing changed, and the rebuild follows on and tries again.
   */
  async #trySwap(db: Kysely<Database>): Promise<RebuildResult | undefined> {
    const { name, projection } = this.#spec
    this.#report('swapping')
    const retired = retiredSchemaName(name, new Date())
    let lockedAt = 0
    let held: readonly Taken[] = []
    let locked = new Map<string, number>()
    let step: Step | undefined
    try {
      await analyzeScratch(db, name, projection)
      await db.transaction().execute(async (trx) => {
        const slots = this.#slots.map((s) => s.key)
        const live = await lockLive(trx, slots, projection, this.#lockWaitMs())
        lockedAt = performance.now()
        for (const slot of slots) {
          const was = this.#live.get(slot) ?? 0
          const now = live.get(slot)?.lastSeq ?? 0
          if (now < was) {
            throw new RebuildError(
              `the live checkpoint of '${slot}' went back from ${was} to ${now} during the rebuild (was the projection reset?); start the rebuild again`,
            )
          }
        }
        locked = new Map(slots.map((s) => [s, live.get(s)?.lastSeq ?? 0]))
        const tail = await this.#tail(locked, lockedAt + this.#opts.maxLockedMs)
        step = await this.#applyIn(trx, tail)
        await swapIn(trx, name, projection, retired)
        held = tail
      })
    } catch (err) {
      step = undefined
      if (err instanceof RebuildError || this.#signal.aborted) throw err
      this.#deferred++
      const waitedMs = this.#lockWaitMs()
      if (isLockTimeout(err)) this.#lockTimeouts++
      this.#log.info(
        { err: errorSummary(err), attempt: this.#deferred, lockWaitMs: waitedMs },
        'swap deferred: the live processor goes first',
      )
      if (this.#deferred >= MAX_DEFERRED_SWAPS) {
        throw new RebuildError(
          `could not swap '${name}' in ${MAX_DEFERRED_SWAPS} attempts; last: ${errorSummary(err)}`,
          { cause: err },
        )
      }
      this.#report('rebuilding')
      return undefined
    }
    const lockedMs = performance.now() - lockedAt
    if (step) this.#advance(step)
    const applied = new Set(held)
    this.#setCarry(this.#carry.filter((c) => !applied.has(c)))
    this.#live = locked
    const checkpoint = this.#maxLive(locked)
    this.#report('swapped')
    this.#log.info(
      { checkpoint, lockedMs: Math.round(lockedMs), retired },
      'swapped the rebuilt tables in',
    )
    if (!this.#opts.keepRetired) await dropRetired(this.#deps.db, retired)
    return {
      processor: name,
      applied: this.#applied,
      refused: this.#refused,
      skipped: this.#skipped,
      checkpoint,
      retired: this.#opts.keepRetired ? retired : null,
      elapsedMs: performance.now() - this.#started,
      lockedMs,
      deferredSwaps: this.#deferred,
    }
  }

  /**
   * How long this swap waits for the live tables: `lockTimeoutMs`, doubled for every earlier swap
   * that did not get them in time, up to {@link MAX_LOCK_WAIT_MS}. On a loaded machine the live
   * processor's batches and the outbox relay's transactions (which publish while holding their
   * rows) often last longer than 500 ms; with a fixed wait the swap could lose every time and the
   * rebuild follow the live processor until it gave up.
   */
  #lockWaitMs(): number {
    return Math.min(this.#opts.lockTimeoutMs * 2 ** this.#lockTimeouts, MAX_LOCK_WAIT_MS)
  }

  /**
   * Every message the locked live checkpoints cover and the new tables lack, read while the live
   * tables are held: at most {@link MAX_TAIL} read, by `deadline`, or the swap is deferred. They
   * stay in the carry until the swap commits.
   */
  async #tail(live: ReadonlyMap<string, number>, deadline: number): Promise<Taken[]> {
    const reader = this.#reader as StreamReader
    const limit = this.#maxLive(live)
    // Slots with a carried message beyond their locked checkpoint: once every slot has one,
    // nothing more can be covered. Kept up to date as messages are read (the tables are held).
    const past = new Set<string>()
    for (const c of this.#carry) if (!covered(c, live)) past.add(c.slot)
    while (reader.lastSeq < limit && past.size < this.#slots.length) {
      if (performance.now() > deadline || this.#carry.length > MAX_TAIL) {
        throw new Error(
          `the live processor is ${limit - reader.lastSeq} stream sequences ahead; catching up first`,
        )
      }
      const m = await reader.next(50)
      if (m !== undefined) {
        const slot = this.#slotOf(m)
        if (slot === undefined) {
          this.#skipped++
          continue
        }
        const t = this.#decideOne(m, slot)
        this.#carryOn(t)
        if (!covered(t, live)) past.add(slot)
      } else if (await reader.drained()) break // nothing of this subject up to the checkpoints is left
    }
    return this.#carry.filter((c) => covered(c, live))
  }

  #report(phase: RebuildProgress['phase']): void {
    this.#phase = phase
    this.#onProgress?.({
      phase: this.#phase,
      applied: this.#applied,
      refused: this.#refused,
      skipped: this.#skipped,
      position: this.#pos.lastSeq,
      remaining:
        this.#reader?.pending === undefined ? undefined : this.#reader.pending + this.#carry.length,
      liveCheckpoint: this.#maxLive(),
    })
  }

  #throwIfAborted(): void {
    if (this.#signal.aborted) {
      throw new RebuildError(
        `rebuild of '${this.#spec.name}' interrupted; the live tables are untouched`,
      )
    }
  }
}

/**
 * A message read and decided ({@link decide}), held until it is applied: in a batch, or carried
 * ahead of its slot's live checkpoint until the checkpoint reaches it.
 */
interface Taken {
  readonly seq: number
  readonly slot: string
  /** The event to apply, or why there is none: refused, or skipped (parked, redrive for another processor, another kind). */
  readonly event: ProjectedEvent | typeof REFUSE | typeof SKIP
}

const REFUSE = 'refuse'
const SKIP = 'skip'

/** Whether the live run has applied `t` (its slot's checkpoint is at or past it). */
function covered(t: Taken, live: ReadonlyMap<string, number>): boolean {
  return t.seq <= (live.get(t.slot) ?? 0)
}

/**
 * Messages the stream reader asks the server for at a time. Small on purpose: a message waiting
 * in the client's buffer outlives a few young-generation collections (at `--max-semi-space-size=4`
 * one runs every few hundred messages a rebuild reads) and is copied into the old generation;
 * at 10,000 the rebuild's peak RSS was 350-410 MB, at 1,000 (and decided as read, {@link Taken})
 * 290-340 MB, reading as fast.
 */
const READ_BUFFER = 1000

/** Most events the swap applies while it holds the live tables. */
const MAX_TAIL = 20_000
/**
 * Most messages held back because their partition's live checkpoint has not reached them; when
 * full, the rebuild waits for the live processors rather than read on.
 */
const MAX_CARRY = 50_000
/** Most a swap waits for the live tables (the live processor waits behind it as long). */
const MAX_LOCK_WAIT_MS = 8000

/** Postgres' lock_not_available: a lock not granted within `lock_timeout`. */
function isLockTimeout(err: unknown): boolean {
  return (err as { code?: unknown } | null)?.code === '55P03'
}

/** Swap attempts before the rebuild gives up (the live processor never let go of its tables). */
const MAX_DEFERRED_SWAPS = 200
