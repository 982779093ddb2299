/**
 * Runs a processor: supervises it (backoff after a failed membership), and keeps its membership
 * among the processor's instances, taking and giving back slots (processors/partitions.ts) as
 * instances come and go, each consumed by its own {@link SlotSession}.
 */
import {
  jetstream,
  jetstreamManager,
  type JetStreamClient,
  type JetStreamManager,
} from '@nats-io/jetstream'
import { ExponentialBackoff, type IBackoff } from 'cockatiel'
import type { Kysely } from 'kysely'
import { createBreaker, type Breaker } from '../../infra/failures.ts'
import type { Logger } from '../../infra/logger.ts'
import { errorSummary } from '../../infra/retry.ts'
import { sleep, Wakeup } from '../../infra/sleep.ts'
import type { Database } from '../../projections/tables.ts'
import { slotsOf, type Slot } from '../partitions.ts'
import { Lease, REBALANCE_MS, shareOf } from '../progress/locks.ts'
import { fencedDatabase } from '../progress/slot-fence.ts'
import { isAborted, type RunnerContext } from './context.ts'
import { ProcessorCounters } from './counters.ts'
import { SlotSession } from './slot-session.ts'
import type {
  DeliveryFigures,
  ProcessorDeps,
  ProcessorSpec,
  ProcessorStats,
  RunningProcessor,
} from './types.ts'

/**
 * Runs a processor until stopped. Never assumes NATS or Postgres is up: every failure is logged
 * and retried with exponential backoff and jitter, and each session starts again from the
 * checkpoint in Postgres.
 */
export function startProcessor(spec: ProcessorSpec, deps: ProcessorDeps): RunningProcessor {
  return new ProcessorRunner(spec, deps)
}

class ProcessorRunner implements RunningProcessor {
  readonly name: string
  readonly stats: ProcessorStats = {
    received: 0,
    applied: 0,
    rejected: 0,
    skipped: 0,
    batches: 0,
    checkpoint: 0,
    slots: {},
    retries: 0,
    poisoned: 0,
    state: 'starting',
    postgres: 'closed',
  }
  readonly done: Promise<void>
  /** The slots this instance owns now, each with its session (kept by {@link #membership}). */
  readonly #owned = new Map<Slot, OwnedSlot>()
  readonly #spec: ProcessorSpec
  readonly #deps: ProcessorDeps
  readonly #log: Logger
  readonly #js: JetStreamClient
  readonly #stopping = new AbortController()
  readonly #slots: readonly Slot[]
  readonly #postgres: Breaker
  readonly #counters: ProcessorCounters
  /** Events parked for handler failures since the last successful commit of any event. */
  #consecutivePoison = 0
  /** Times the NATS connection came back: the stream may have changed meanwhile. */
  #reconnects = 0

  constructor(spec: ProcessorSpec, deps: ProcessorDeps) {
    this.name = spec.name
    this.#spec = spec
    this.#deps = deps
    this.#log = deps.log.child({ processor: spec.name })
    this.#js = jetstream(deps.nc)
    this.#slots = slotsOf(spec, deps.config)
    this.#postgres = createBreaker('postgres', this.#log)
    this.#counters = new ProcessorCounters(this.stats, deps.metrics?.register(this))
    this.#postgres.policy.onStateChange(() => {
      this.stats.postgres = this.#postgres.state
    })
    const companion = spec.companion?.(deps, this.#stopping.signal).catch((err: unknown) => {
      this.#log.error({ err: errorSummary(err) }, `${spec.name} companion stopped`)
    })
    void this.#countReconnects()
    this.done = Promise.all([this.#supervise(), companion]).then(() => undefined)
  }

  async #countReconnects(): Promise<void> {
    for await (const s of this.#deps.nc.status()) if (s.type === 'reconnect') this.#reconnects++
  }

  deliveries(freshMs: number): Record<string, DeliveryFigures> {
    const now = performance.now()
    const out: Record<string, DeliveryFigures> = {}
    for (const [slot, { session }] of this.#owned) {
      const figures = session.deliveries(now, freshMs)
      if (figures !== undefined) out[slot.key] = figures
    }
    return out
  }

  async stop(): Promise<void> {
    this.#stopping.abort()
    await this.done
  }

  async #supervise(): Promise<void> {
    const signal = this.#stopping.signal
    const backoff = new ExponentialBackoff({ initialDelay: 250, maxDelay: 15_000 }).next()
    let delay = backoff
    while (!signal.aborted) {
      try {
        await this.#membership(signal, () => (delay = backoff))
      } catch (err) {
        if (isAborted(signal)) break
        this.stats.state = 'backing-off'
        this.#log.warn(
          { err: errorSummary(err), retryInMs: Math.round(delay.duration) },
          'processor session failed',
        )
        await sleep(delay.duration, signal)
        delay = delay.next(undefined)
      }
    }
    this.stats.state = 'stopped'
    this.#log.info({ checkpoint: this.stats.checkpoint }, 'processor stopped')
  }

  /**
   * One membership among the processor's instances: a Postgres session holds this instance's
   * locks (see {@link Lease}); slots are taken and given back as instances come and go, each
   * consumed by its own {@link SlotSession}. Ends (and every slot session with it) when that
   * Postgres session breaks.
   */
  async #membership(signal: AbortSignal, healthy: () => void): Promise<void> {
    // While the breaker is open this fails at once; after its backoff it lets one probe through.
    await this.#postgres.policy.execute(() => this.#deps.pool.query('select 1'))
    const owned = this.#owned // empty: a membership ends only once every session has
    const wake = new Wakeup()
    const jsm = await slotJetStreamManager(this.#deps.jsm, this.#deps.nc)
    const lease = await Lease.open(
      this.#deps.pool,
      this.name,
      (err) => {
        // Frozen, cut off, or the connection broke: another instance may own these slots already.
        // Their transactions cannot commit any more (processors/progress/slot-fence.ts); end them now.
        this.#log.warn(
          { err: errorSummary(err), slots: [...owned.keys()].map((s) => s.key) },
          "lost the Postgres session that holds this instance's slots; giving them up",
        )
        for (const o of owned.values()) o.session.interrupt()
        this.stats.state = 'backing-off' // not ready, even while a session cut off still winds down
        wake.notify()
      },
      () => {
        wake.notify() // another instance joined, gave a slot back or left: look at the share now
      },
    )
    const backoffs = new Map<Slot, { until: number; delay: IBackoff<unknown> }>()
    try {
      while (!(await lease.join())) {
        this.stats.state = 'standby'
        await sleep(REBALANCE_MS, signal)
        if (signal.aborted) return
      }
      const joinedAt = Date.now()
      const graceMs = this.#deps.config.processor.joinGraceMs
      while (!signal.aborted) {
        if (lease.lost) {
          throw new Error('lost the connection holding the processor locks', { cause: lease.lost })
        }
        const { mine: wanted, instances } = await lease.share(this.#slots)
        // Alone just after joining: instances started together join a moment apart, and a slot
        // taken now and handed over when the next one joins is anchored twice before its first
        // batch. So only what this instance keeps once a second one has joined is taken now, the
        // rest after the grace (PROCESSOR_JOIN_GRACE_MS). Measured (bench scale-out: six processes
        // starting at once on 2 cores): the instances of a processor joined within ~0.3 s, and a
        // slot handed over started its first batch ~2.5 s after the others, its four JetStream
        // API requests queued in nats-server 2.9's one API queue behind every starting slot's.
        const graceLeft = instances === 1 ? joinedAt + graceMs - Date.now() : 0
        // Alone, it ranks first once another joins: a later instance takes a higher member index.
        const takeNow = graceLeft > 0 ? shareOf(this.#slots, 0, 2) : wanted
        let handingOver = false
        for (const slot of this.#slots) {
          const mine = owned.get(slot)
          if (mine !== undefined) {
            if (!wanted.has(slot)) mine.session.giveUp() // another instance's share now
            continue
          }
          if (!takeNow.has(slot) || (backoffs.get(slot)?.until ?? 0) > Date.now()) continue
          if (!(await lease.tryAcquire(slot.key))) {
            handingOver = true // its owner has not let go yet: it will after its batch in hand
            continue
          }
          const db = fencedDatabase(this.#deps.pool, lease, slot.key)
          const session = new SlotSession(slot, this.#context(db, jsm), signal)
          const startedAt = Date.now()
          const entry: OwnedSlot = { session, ended: Promise.resolve() }
          entry.ended = session
            .run()
            .then(
              () => {
                backoffs.delete(slot)
              },
              (err: unknown) => {
                if (signal.aborted) return
                // A session that had been going for a while starts its backoff afresh; one that
                // fails again soon after starting waits longer each time.
                const lasted = Date.now() - startedAt > SLOT_HEALTHY_MS
                const previous = lasted ? undefined : backoffs.get(slot)?.delay
                const delay = previous?.next(undefined) ?? SLOT_BACKOFF.next()
                backoffs.set(slot, { until: Date.now() + delay.duration, delay })
                this.#log.warn(
                  {
                    slot: slot.key,
                    err: errorSummary(err),
                    retryInMs: Math.round(delay.duration),
                  },
                  'processor session failed',
                )
              },
            )
            .finally(async () => {
              // The slot is given back before the session counts as ended, so the lease is
              // never closed (and its connection returned to the pool) under a release.
              owned.delete(slot)
              this.#counters.slotReleased(slot.key)
              await lease.release(slot.key).catch(() => undefined)
              wake.notify()
            })
          owned.set(slot, entry)
        }
        const waiting = [...backoffs.values()].some((b) => b.until > Date.now())
        const state = owned.size > 0 ? 'running' : waiting ? 'backing-off' : 'standby'
        if (state === 'standby' && this.stats.state !== 'standby') {
          this.#log.info('other instances own every slot of this processor; standing by')
        }
        this.stats.state = state
        if (state === 'running') healthy()
        const soonest = Math.min(
          ...[...backoffs.values()].map((b) => b.until).filter((t) => t > Date.now()),
          graceLeft > 0 ? joinedAt + graceMs : Number.POSITIVE_INFINITY,
        )
        // A slot handed over is idle until its new owner takes it: look again soon for that.
        const next = handingOver ? HAND_OVER_POLL_MS : REBALANCE_MS
        await wake.wait(Math.max(10, Math.min(next, soonest - Date.now())), signal)
      }
    } finally {
      const ending = [...owned.values()]
      for (const o of ending) o.session.interrupt()
      await Promise.all(ending.map((o) => o.ended))
      await lease.close()
    }
  }

  /** What every slot session of this instance shares; `db` is the slot's, fenced by its lease. */
  #context(db: Kysely<Database>, jsm: JetStreamManager): RunnerContext {
    return {
      spec: this.#spec,
      deps: { ...this.#deps, db, jsm },
      log: this.#log,
      js: this.#js,
      postgres: this.#postgres,
      counters: this.#counters,
      reconnects: () => this.#reconnects,
      poison: {
        get: () => this.#consecutivePoison,
        set: (n) => {
          this.#consecutivePoison = n
        },
      },
    }
  }
}

interface OwnedSlot {
  readonly session: SlotSession
  /** Settles when the session has ended (its failure already handled). */
  ended: Promise<void>
}

/**
 * The JetStream API of the slot sessions: `jsm`'s, waiting up to {@link SLOT_API_TIMEOUT_MS} for an
 * answer. nats-server 2.9 answers JetStream API requests one at a time, and the info of a filtered
 * consumer (a partition's: its num_pending) costs it ~55 ms of CPU on a 200k-event stream, so
 * with a few processes starting slots and reading lag figures at once a cheap request can wait
 * seconds in that queue. A request given up is still answered later (the work is not saved), and
 * a slot session that failed on it would release its slot, back off and ask again: waiting longer
 * costs the server nothing.
 */
async function slotJetStreamManager(
  jsm: JetStreamManager,
  nc: ProcessorDeps['nc'],
): Promise<JetStreamManager> {
  const opts = jsm.getOptions()
  if ((opts.timeout ?? 0) >= SLOT_API_TIMEOUT_MS) return jsm
  return jetstreamManager(nc, { ...opts, checkAPI: false, timeout: SLOT_API_TIMEOUT_MS })
}

/** How long a slot session waits for a JetStream API answer (see {@link slotJetStreamManager}). */
const SLOT_API_TIMEOUT_MS = 20_000
/**
 * While a slot this instance should own is still held by its previous owner, how often it looks
 * (the owner's notice on letting go usually wakes it first; see {@link Lease}).
 */
const HAND_OVER_POLL_MS = 200
/** Waits before a slot whose session failed is taken again (by this instance). */
const SLOT_BACKOFF = new ExponentialBackoff({ initialDelay: 250, maxDelay: 15_000 })
/** A slot session that lasted this long before failing starts the backoff afresh. */
const SLOT_HEALTHY_MS = 30_000
