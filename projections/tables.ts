import type { Generated, Selectable } from 'kysely'

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

/** One commit's range of FLEET_EVENTS, (from_seq, last_seq], and what it read there. */
export interface StreamMarkTable {
  processor: string
  from_seq: number
  last_seq: number
  /** The processor's messages in the range (those its filter subject matches). */
  messages: number
  digest: string
  /** Of the message at last_seq alone. */
  last_digest: string
  committed_at: Generated<Date>
}

/**
 * Per-minute rollup of readings by the device's clock (count, min, max, sum; avg = sum / count).
 * Fed only by readings that were newly inserted, so redelivery and re-publishing never count twice.
 */
export interface ReadingsPerMinuteTable {
  device_id: string
  metric: string
  minute: Date
  count: number
  min: number
  max: number
  sum: number
}

/**
 * A sensor's lifecycle and the status it means. `sensor_status` is the sensor-status read model;
 * `alert_sensors` has the same shape and is the alerts projection's own copy (processors never
 * read each other's tables).
 */
export interface SensorStateTable {
  device_id: string
  status: 'active' | 'inactive' | 'maintenance' | 'decommissioned' | 'unknown'
  /** The event that set the current status (a clock tick for `unknown`). */
  status_hlc: string
  status_event_id: string
  status_correlation_id: string
  status_changed_at: Date
  last_seen_at: Date
  last_seen_hlc: string
  last_seen_event_id: string
  site: string | null
  model: string | null
  firmware: string | null
  inactivity_timeout_seconds: number | null
  registered_hlc: string | null
  registered_event_id: string | null
  decommissioned_hlc: string | null
  declared_status: 'active' | 'inactive' | 'maintenance' | null
  declared_hlc: string | null
  declared_event_id: string | null
  /** The FLEET_EVENTS partition its events arrive on; null when the stream is not partitioned. */
  partition: number | null
}

/** Every status transition, keyed by sensor and the event that caused it. */
export interface SensorStatusHistoryTable {
  device_id: string
  event_id: string
  stream_seq: number
  from_status: string | null
  to_status: string
  hlc: string
  changed_at: Date
  correlation_id: string
  causation_id: string | null
  reason: string
}

/**
 * What a sensor's status timeline is folded from, in HLC order (projections/sensor-tracker.ts):
 * every registration and status change, the first reading or heartbeat, and each silence (the
 * tick that turned the sensor unknown) with the earliest event after it (`again_*`).
 */
export interface SensorTimelineTable {
  device_id: string
  event_id: string
  kind: 'registered' | 'status' | 'first' | 'silent'
  hlc: string
  /** The event's HLC wall time; the tick's time for a silence. */
  at: Date
  /** The status a status change declares. */
  status: string | null
  /** The reason a status change gives. */
  note: string | null
  correlation_id: string
  causation_id: string | null
  stream_seq: number
  again_event_id: string | null
  again_hlc: string | null
  again_correlation_id: string | null
  again_causation_id: string | null
  again_stream_seq: number | null
}

/** Stream time per projection: the newest clock tick it applied. */
export interface ProjectionClockTable {
  projection: string
  now_at: Date
  tick_event_id: string
}

/**
 * Alerts. At most one not-resolved alert per sensor and rule (a partial unique index).
 *
 * ```sql
 * select severity, count(*) from alerts where state = 'open' group by severity;
 * ```
 */
export interface AlertTable {
  /** Deterministic: the same input raises the same id on every replay. */
  alert_id: string
  device_id: string
  rule_id: string
  severity: 'info' | 'warning' | 'critical'
  state: 'open' | 'acknowledged' | 'resolved'
  message: string
  /** The value that raised it (threshold rules). */
  value: number | null
  raised_at: Date
  raised_hlc: string
  raised_event_id: string
  correlation_id: string
  acknowledged_at: Date | null
  acknowledged_hlc: string | null
  acknowledged_by: string | null
  acknowledged_event_id: string | null
  resolved_at: Date | null
  resolved_hlc: string | null
  resolved_event_id: string | null
  /** Times the condition fired while the alert was not resolved (the raise included). */
  occurrences: number
  last_occurrence_event_id: string
}
export type Alert = Selectable<AlertTable>

/**
 * A threshold rule in a breach for one sensor: consecutive breaching readings so far (at least
 * one) and since when. A rule not in a breach has no row.
 */
export interface AlertConditionTable {
  device_id: string
  rule_id: string
  consecutive: number
  since_at: Date | null
  since_hlc: string | null
}

/** Notifications written with the alert change, published by the relay, once. */
export interface NotificationOutboxTable {
  notification_id: string
  alert_id: string
  /** A transition of the alert, or a correction / retraction of one already sent. */
  kind: 'raised' | 'resolved' | 'corrected' | 'retracted'
  subject: string
  payload: unknown
  hlc: string
  /** The notification (already sent) that this one corrects or retracts; null for a transition. */
  corrects: string | null
  /** When the relay had it stored in FLEET_NOTIFICATIONS; null until then. */
  published_at: Date | null
}

/**
 * What the alerts are folded from: a threshold rule's readings (`kind` 'reading', `value`) and a
 * sensor's acknowledgements (`kind` 'ack', `rule_id` '', `alert_id`, `acknowledged_by`).
 */
export interface AlertInputTable {
  device_id: string
  rule_id: string
  event_id: string
  kind: 'reading' | 'ack'
  hlc: string
  correlation_id: string
  value: number | null
  alert_id: string | null
  acknowledged_by: string | null
}

/** Per sensor: the newest input folded, and a digest of the status history folded with it. */
export interface AlertTipTable {
  device_id: string
  hlc: string
  event_id: string
  history: string
  readings_since_prune: number
}

/** Where the kept inputs of a (sensor, rule) begin, and the rule's state there (JSON). */
export interface AlertHorizonTable {
  device_id: string
  rule_id: string
  hlc: string
  event_id: string
  state: unknown
}

export interface Database {
  readings: ReadingTable
  latest_readings: LatestReadingTable
  readings_per_minute: ReadingsPerMinuteTable
  processor_checkpoints: CheckpointTable
  processor_stream_marks: StreamMarkTable
  sensor_status: SensorStateTable
  alert_sensors: SensorStateTable
  sensor_status_history: SensorStatusHistoryTable
  sensor_status_timeline: SensorTimelineTable
  alert_sensors_timeline: SensorTimelineTable
  projection_clocks: ProjectionClockTable
  alerts: AlertTable
  alert_conditions: AlertConditionTable
  notification_outbox: NotificationOutboxTable
  alert_inputs: AlertInputTable
  alert_horizons: AlertHorizonTable
  alert_tips: AlertTipTable
}
