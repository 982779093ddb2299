import type { Generated, Insertable, Selectable } from 'kysely'

/**
 * Every reading ever recorded, one row per distinct eventId.
 *
 * ```sql
 * select * from readings where device_id = 'sensor-7' and metric = 'temperature'
 *   and occurred_at > now() - interval '1 hour' order by hlc;
 * ```
 */
export interface ReadingTable {
  event_id: string
  device_id: string
  metric: string
  value: number
  unit: string
  /** Device clock. */
  occurred_at: Date
  /** Cluster order (text COLLATE "C": string order is clock order). */
  hlc: string
  correlation_id: string
  causation_id: string | null
  /** FLEET_EVENTS sequence of the copy that was applied. */
  stream_seq: number
  /** When the stream stored it (server clock); the same on every replay. */
  ingested_at: Date
}
export type Reading = Selectable<ReadingTable>
export type NewReading = Insertable<ReadingTable>

/** The newest value per sensor and metric, decided by HLC (never by arrival order). */
export interface LatestReadingTable {
  device_id: string
  metric: string
  value: number
  unit: string
  occurred_at: Date
  hlc: string
  event_id: string
  correlation_id: string
  stream_seq: number
}
export type LatestReading = Selectable<LatestReadingTable>

/**
 * How far each processor got: written in the same transaction as its read-model rows, so the two
 * never disagree. `last_seq` is a FLEET_EVENTS sequence; `hlc` the newest event HLC applied.
 */
export interface CheckpointTable {
  processor: string
  stream: string
  last_seq: number
  hlc: string | null
  updated_at: Generated<Date>
}
export type Checkpoint = Selectable<CheckpointTable>

export interface Database {
  readings: ReadingTable
  latest_readings: LatestReadingTable
  processor_checkpoints: CheckpointTable
}
