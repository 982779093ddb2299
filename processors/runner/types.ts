/**
 * The processor contract: what a processor is ({@link ProcessorSpec}), what it runs on
 * ({@link ProcessorDeps}), what a running one shows ({@link RunningProcessor}, {@link ProcessorStats})
 * and what it reports to ({@link ProcessorMetrics}). Kept apart from the runner, so the metrics,
 * the partitions and the CLI take the types without importing the implementation (no import circle).
 */
import type { JetStreamManager } from '@nats-io/jetstream'
import type { NatsConnection } from '@nats-io/transport-node'
import type { Kysely } from 'kysely'
import type pg from 'pg'
import type { Config } from '../../infra/config.ts'
import type { BreakerState } from '../../infra/failures.ts'
import type { Logger } from '../../infra/logger.ts'
import type { AnyProjection, BulkLoad, ProjectedEvent } from '../../projections/projection.ts'
import type { Database } from '../../projections/tables.ts'
import type { RejectReason } from '../../schemas/decode.ts'
import type { EventKind } from '../../schemas/events.ts'

/**
 * A processor: one durable consumer on FLEET_EVENTS feeding one projection.
 *
 * ```ts
 * export const readingsProcessor: ProcessorSpec = {
 *   name: 'readings', reads: 'reading', projection: readingsProjection,
 * }
 * ```
 */
export interface ProcessorSpec {
  /** Durable consumer name and checkpoint key (with `-p<N>` per partition), DLQ subject token. */
  readonly name: string
  /**
   * The events it reads: one kind, or all. Its consumers read the whole stream (or partition,
   * {@link slotsOf}) so that redrives reach them; `decide()` skips the other kinds.
   */
  readonly reads: EventKind | 'all'
  readonly projection: AnyProjection
  /**
   * A rebuild's bulk phase into empty tables ({@link BulkLoad}), built with the same
   * options as `projection`; without one, a rebuild applies the stream through `projection` in chunks.
   */
  readonly bulkLoad?: () => BulkLoad
  /** Runs beside the processor while it runs (e.g. the alerts' outbox relay). */
  readonly companion?: (deps: ProcessorDeps, signal: AbortSignal) => Promise<void>
}

export interface ProcessorDeps {
  readonly nc: NatsConnection
  readonly jsm: JetStreamManager
  readonly db: Kysely<Database>
  /** The pool `db` runs on: each instance's lock session and its slots' transactions come from it. */
  readonly pool: pg.Pool
  readonly config: Config
  readonly log: Logger
  /** Where the processor reports what it does (Prometheus); nothing is reported without it. */
  readonly metrics?: MetricsSink
}

export interface ProcessorStats {
  /** Messages taken off the consumer, redeliveries included. */
  received: number
  /** Events committed to the read model (idempotent re-applies included). */
  applied: number
  /** Events parked in FLEET_DLQ. */
  rejected: number
  /** Redeliveries of events at or below the checkpoint, acked without work. */
  skipped: number
  batches: number
  /**
   * The newest stream sequence committed (the checkpoint of a processor that is not
   * partitioned; the highest of the partitions' checkpoints this instance owns otherwise).
   */
  checkpoint: number
  /** The checkpoint of each slot this instance owns now (see {@link slotsOf}). */
  slots: Record<string, number>
  /** Transactions that failed and were retried. */
  retries: number
  /** Events parked because the projection failed on them every time (a subset of `rejected`). */
  poisoned: number
  state: 'starting' | 'standby' | 'running' | 'backing-off' | 'stopped'
  /** The Postgres circuit breaker: open means the processor has stopped fetching. */
  postgres: BreakerState
}

/**
 * A slot consumer's counts as this instance sees them from its deliveries, the same counts its
 * consumer info reports, without asking the server for them.
 */
export interface DeliveryFigures {
  /** Matching messages not delivered yet, as of the newest delivery (its `num_pending`). */
  readonly pending: number
  /** Delivered and not acked yet. */
  readonly ackPending: number
  /** Stream sequence of the newest delivery. */
  readonly deliveredSeq: number
}

export interface RunningProcessor {
  readonly name: string
  readonly stats: Readonly<ProcessorStats>
  /**
   * Per slot this instance owns whose newest delivery was new to a look at most `freshMs` ago
   * (each call is a look): its consumer's counts as of that delivery. A slot left out (idle,
   * stalled, just taken) is for the server to report.
   */
  deliveries(freshMs: number): Readonly<Record<string, DeliveryFigures>>
  /** Finish the batch in hand (or abandon it uncommitted if the database is down), then stop. */
  stop(): Promise<void>
  /** Settles when the processor has stopped. */
  readonly done: Promise<void>
}

/**
 * What a processor reports as it works, with its name already bound as the `processor` label.
 * The runner calls it; it never throws and never waits.
 *
 * ```ts
 * const m = metrics.register(runner)
 * m.committed(events) // end-to-end latency of each, events processed
 * ```
 */
export interface ProcessorMetrics {
  /** A batch was committed and acked: how many messages it held and how long it took. */
  batch(size: number, seconds: number): void
  /** Events committed to the read model with the checkpoint. */
  committed(events: readonly ProjectedEvent[]): void
  /** An event was parked in FLEET_DLQ. */
  parked(reason: RejectReason): void
  /** A redelivery at or below the checkpoint (or a redrive for another processor) was acked unapplied. */
  skipped(): void
  /** A transaction failed transiently and is tried again. */
  retried(): void
  /** The stream no longer held what was applied, and the checkpoint went back (a failover). */
  rewound(): void
}

/** Where processors report to: the process's metrics (processors/metrics.ts). */
export interface MetricsSink {
  /**
   * Exports a processor's state, circuit breaker, lag and DLQ depth from now on, and returns the
   * instruments it reports to (the runner calls this when it starts).
   */
  register(processor: RunningProcessor): ProcessorMetrics
}
