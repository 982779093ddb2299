/**
 * What a processor instance counts, recorded once per fact: each call updates the live stats (the
 * CLI's progress and `--json`) and the Prometheus instruments together, so the two never drift.
 * The batch's spans (processors/tracing.ts) are events of one batch, not counters.
 */
import type { ProjectedEvent } from '../../projections/projection.ts'
import type { RejectReason } from '../../schemas/decode.ts'
import type { ProcessorMetrics, ProcessorStats } from './types.ts'

export class ProcessorCounters {
  readonly #stats: ProcessorStats
  readonly #metrics: ProcessorMetrics | undefined

  constructor(stats: ProcessorStats, metrics: ProcessorMetrics | undefined) {
    this.#stats = stats
    this.#metrics = metrics
  }

  /** Messages taken off the consumer, redeliveries included. */
  received(count: number): void {
    this.#stats.received += count
  }

  /** A redelivery at or below the checkpoint (or another processor's redrive) acked unapplied. */
  skipped(): void {
    this.#stats.skipped++
    this.#metrics?.skipped()
  }

  /** Events committed to the read model with the checkpoint. */
  committed(events: readonly ProjectedEvent[]): void {
    this.#stats.applied += events.length
    this.#metrics?.committed(events)
  }

  /** A batch was committed and acked: how many messages it held and how long it took. */
  batch(size: number, seconds: number): void {
    this.#stats.batches++
    this.#metrics?.batch(size, seconds)
  }

  /** An event was parked in FLEET_DLQ. */
  parked(reason: RejectReason): void {
    this.#stats.rejected++
    this.#metrics?.parked(reason)
  }

  /** The event just parked was poison: the projection failed on it every time. */
  poisoned(): void {
    this.#stats.poisoned++
  }

  /** A transaction failed transiently and is tried again. */
  retried(): void {
    this.#stats.retries++
    this.#metrics?.retried()
  }

  /** The stream no longer held what was applied, and the checkpoint went back. */
  rewound(): void {
    this.#metrics?.rewound()
  }

  /** A slot's checkpoint is now `seq`. */
  checkpointAt(slotKey: string, seq: number): void {
    this.#stats.slots[slotKey] = seq
    this.#stats.checkpoint = Math.max(0, ...Object.values(this.#stats.slots))
  }

  /** This instance no longer owns the slot. */
  slotReleased(slotKey: string): void {
    this.#stats.slots = Object.fromEntries(
      Object.entries(this.#stats.slots).filter(([key]) => key !== slotKey),
    )
  }
}
