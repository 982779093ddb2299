import { sql, type Transaction } from 'kysely'
import type { ClockTicked, DeviceEvent } from '../schemas/events.ts'
import type { ProjectedEvent } from './projection.ts'
import {
  effectiveStatus,
  hlcTime,
  NEW_SENSOR,
  observe,
  type EffectiveStatus,
  type SensorLifecycle,
} from './sensor-lifecycle.ts'
import type { Database, SensorStateTable } from './tables.ts'

/** A sensor's status moved, and which event moved it. */
export interface Transition {
  readonly deviceId: string
  /** `null` when the sensor is new. */
  readonly from: EffectiveStatus | null
  readonly to: EffectiveStatus
  readonly eventId: string
  readonly streamSeq: number
  readonly hlc: string
  readonly correlationId: string
  readonly causationId: string | null
  /** Cluster time of the change: the event's HLC wall time, or the tick's time. */
  readonly at: Date
  readonly reason: string
}

interface Tracked {
  lifecycle: SensorLifecycle
  status: EffectiveStatus | null
  statusHlc: string | null
  statusEventId: string | null
  statusCorrelationId: string | null
  statusChangedAt: Date | null
  partition: number | null
  dirty: boolean
}

/** The tables that hold sensor state with this shape. */
export type SensorStateTableName = 'sensor_status' | 'alert_sensors'

/**
 * Sensor lifecycle kept in a table: `sensor_status` for the sensor-status projection, and
 * `alert_sensors` for the alerts projection, which must judge silence without reading another
 * projection's tables. One mechanism, two owners.
 *
 * ```ts
 * const segment = await tracker.load(trx, events)   // the sensors of a run of device events
 * for (const e of events) segment.apply(e)     // in stream order; returns a Transition or undefined
 * await segment.flush(trx)
 * await tracker.tick(trx, tickEvent)            // sensors that fell silent: active -> unknown
 * ```
 */
export class SensorTracker {
  constructor(
    readonly table: SensorStateTableName,
    /** Key of this projection's row in `projection_clocks` (with `-p<N>` per partition). */
    readonly clock: string,
    readonly defaultTimeoutSeconds: number,
  ) {}

  /**
   * The `projection_clocks` row of a partition's stream time. Each partition has its own: its
   * ticks arrive in its own order, possibly processed by another instance.
   */
  clockKey(partition: number | undefined): string {
    return partition === undefined ? this.clock : `${this.clock}-p${partition}`
  }

  /**
   * Stream time per partition: the newest tick applied there, or null before the first.
   */
  async now(
    trx: Transaction<Database>,
    partitions: readonly (number | undefined)[],
  ): Promise<Map<number | undefined, number | null>> {
    const keys = partitions.map((p) => this.clockKey(p))
    const rows =
      keys.length === 0
        ? []
        : await trx
            .selectFrom('projection_clocks')
            .select(['projection', 'now_at'])
            .where('projection', 'in', keys)
            .execute()
    const at = new Map(rows.map((r) => [r.projection, r.now_at.getTime()]))
    return new Map(partitions.map((p) => [p, at.get(this.clockKey(p)) ?? null]))
  }

  /** Loads (and locks) the sensors of a run of events with no tick among them. */
  async load(
    trx: Transaction<Database>,
    events: readonly ProjectedEvent<DeviceEvent>[],
  ): Promise<TrackerSegment> {
    const deviceIds = deviceIdsOf(events)
    const partitions = [...new Set(events.map((e) => e.partition))]
    const rows =
      deviceIds.length === 0
        ? []
        : (
            await sql<SensorStateTable>`select * from ${sql.table(this.table)}
              where device_id = any(${[...deviceIds]}::text[]) order by device_id for update`.execute(
              trx,
            )
          ).rows
    const tracked = new Map<string, Tracked>()
    for (const r of rows) tracked.set(r.device_id, fromRow(r))
    return new TrackerSegment(this, tracked, await this.now(trx, partitions))
  }

  /**
   * Applies a tick: moves its partition's stream time forward (never back) and turns every active
   * sensor of that partition that has been silent past its timeout into `unknown`, in one
   * statement. Returns those transitions.
   */
  async tick(trx: Transaction<Database>, e: ProjectedEvent<ClockTicked>): Promise<Transition[]> {
    const at = new Date(e.event.data.at)
    const now = (await this.now(trx, [e.partition])).get(e.partition) ?? null
    if (now !== null && at.getTime() <= now) return []
    await sql`insert into projection_clocks (projection, now_at, tick_event_id)
              values (${this.clockKey(e.partition)}, ${at.toISOString()}, ${e.event.eventId})
              on conflict (projection) do update set now_at = excluded.now_at, tick_event_id = excluded.tick_event_id`.execute(
      trx,
    )
    // Must agree with isSilent(): silent when now - last seen > timeout.
    const silenced = await sql<{ device_id: string }>`
      update ${sql.table(this.table)} set status = 'unknown', status_hlc = ${e.event.hlc},
        status_event_id = ${e.event.eventId}, status_correlation_id = ${e.event.correlationId},
        status_changed_at = ${at.toISOString()}
      where status = 'active' and partition is not distinct from ${e.partition ?? null}::smallint
        and last_seen_at < ${at.toISOString()}::timestamptz
            - make_interval(secs => coalesce(inactivity_timeout_seconds, ${this.defaultTimeoutSeconds}))
      returning device_id`.execute(trx)
    return silenced.rows
      .map((r) => r.device_id)
      .sort()
      .map((deviceId) => ({
        deviceId,
        from: 'active' as const,
        to: 'unknown' as const,
        eventId: e.event.eventId,
        streamSeq: e.streamSeq,
        hlc: e.event.hlc,
        correlationId: e.event.correlationId,
        causationId: e.event.causationId ?? null,
        at,
        reason: 'silent',
      }))
  }
}

/** Sensors of one run of events, in memory until flushed. */
export class TrackerSegment {
  constructor(
    private readonly tracker: SensorTracker,
    private readonly sensors: Map<string, Tracked>,
    /** Stream time of each partition the run's events come from. */
    private readonly nowMs: ReadonlyMap<number | undefined, number | null>,
  ) {}

  /** Folds one event in; returns the status change it caused, if any. */
  apply(p: ProjectedEvent<DeviceEvent>): Transition | undefined {
    const e = p.event
    const t = this.sensors.get(e.deviceId) ?? newTracked()
    this.sensors.set(e.deviceId, t)
    const lifecycle = observe(t.lifecycle, e)
    if (lifecycle === t.lifecycle && t.status !== null) return undefined
    t.lifecycle = lifecycle
    t.partition = p.partition ?? null
    t.dirty = true
    const now = this.nowMs.get(p.partition) ?? null
    const to = effectiveStatus(lifecycle, now, this.tracker.defaultTimeoutSeconds)
    if (to === t.status) return undefined
    const transition: Transition = {
      deviceId: e.deviceId,
      from: t.status,
      to,
      eventId: e.eventId,
      streamSeq: p.streamSeq,
      hlc: e.hlc,
      correlationId: e.correlationId,
      causationId: e.causationId ?? null,
      at: hlcTime(e.hlc),
      reason: reasonFor(p.event, t.status, to),
    }
    t.status = to
    t.statusHlc = e.hlc
    t.statusEventId = e.eventId
    t.statusCorrelationId = e.correlationId
    t.statusChangedAt = transition.at
    return transition
  }

  /** A sensor's status as of the events applied so far. */
  status(deviceId: string): EffectiveStatus | null {
    return this.sensors.get(deviceId)?.status ?? null
  }

  /** Writes every changed sensor back in one statement. */
  async flush(trx: Transaction<Database>): Promise<void> {
    const rows = [...this.sensors.entries()].filter(([, t]) => t.dirty && t.status !== null)
    if (rows.length === 0) return
    const col = <T>(f: (id: string, t: Tracked) => T) => rows.map(([id, t]) => f(id, t))
    const l = (id: string, t: Tracked) => t.lifecycle
    await sql`
      insert into ${sql.table(this.tracker.table)} (device_id, status, status_hlc, status_event_id,
        status_correlation_id, status_changed_at, last_seen_at, last_seen_hlc, last_seen_event_id,
        site, model, firmware, inactivity_timeout_seconds, registered_hlc, registered_event_id,
        decommissioned_hlc, declared_status, declared_hlc, declared_event_id, partition)
      select * from unnest(
        ${col((id) => id)}::text[], ${col((_, t) => t.status)}::text[], ${col((_, t) => t.statusHlc)}::text[],
        ${col((_, t) => t.statusEventId)}::text[], ${col((_, t) => t.statusCorrelationId)}::text[],
        ${col((_, t) => t.statusChangedAt?.toISOString() ?? null)}::timestamptz[],
        ${col((id, t) => (l(id, t).lastSeenHlc ? hlcTime(l(id, t).lastSeenHlc as string).toISOString() : null))}::timestamptz[],
        ${col((id, t) => l(id, t).lastSeenHlc)}::text[], ${col((id, t) => l(id, t).lastSeenEventId)}::text[],
        ${col((id, t) => l(id, t).site)}::text[], ${col((id, t) => l(id, t).model)}::text[],
        ${col((id, t) => l(id, t).firmware)}::text[], ${col((id, t) => l(id, t).inactivityTimeoutSeconds)}::int[],
        ${col((id, t) => l(id, t).registeredHlc)}::text[], ${col((id, t) => l(id, t).registeredEventId)}::text[],
        ${col((id, t) => l(id, t).decommissionedHlc)}::text[], ${col((id, t) => l(id, t).declaredStatus)}::text[],
        ${col((id, t) => l(id, t).declaredHlc)}::text[], ${col((id, t) => l(id, t).declaredEventId)}::text[],
        ${col((_, t) => t.partition)}::smallint[])
      on conflict (device_id) do update set
        status = excluded.status, status_hlc = excluded.status_hlc, status_event_id = excluded.status_event_id,
        status_correlation_id = excluded.status_correlation_id, status_changed_at = excluded.status_changed_at,
        last_seen_at = excluded.last_seen_at, last_seen_hlc = excluded.last_seen_hlc,
        last_seen_event_id = excluded.last_seen_event_id, site = excluded.site, model = excluded.model,
        firmware = excluded.firmware, inactivity_timeout_seconds = excluded.inactivity_timeout_seconds,
        registered_hlc = excluded.registered_hlc, registered_event_id = excluded.registered_event_id,
        decommissioned_hlc = excluded.decommissioned_hlc, declared_status = excluded.declared_status,
        declared_hlc = excluded.declared_hlc, declared_event_id = excluded.declared_event_id,
        partition = excluded.partition`.execute(trx)
    for (const [, t] of rows) t.dirty = false
  }
}

function newTracked(): Tracked {
  return {
    lifecycle: NEW_SENSOR,
    status: null,
    statusHlc: null,
    statusEventId: null,
    statusCorrelationId: null,
    statusChangedAt: null,
    partition: null,
    dirty: false,
  }
}

function fromRow(r: SensorStateTable): Tracked {
  return {
    lifecycle: {
      lastSeenHlc: r.last_seen_hlc,
      lastSeenEventId: r.last_seen_event_id,
      registeredHlc: r.registered_hlc,
      registeredEventId: r.registered_event_id,
      site: r.site,
      model: r.model,
      firmware: r.firmware,
      inactivityTimeoutSeconds: r.inactivity_timeout_seconds,
      decommissionedHlc: r.decommissioned_hlc,
      declaredStatus: r.declared_status,
      declaredHlc: r.declared_hlc,
      declaredEventId: r.declared_event_id,
    },
    status: r.status,
    statusHlc: r.status_hlc,
    statusEventId: r.status_event_id,
    statusCorrelationId: r.status_correlation_id,
    statusChangedAt: r.status_changed_at,
    partition: r.partition,
    dirty: false,
  }
}

function reasonFor(e: DeviceEvent, from: EffectiveStatus | null, to: EffectiveStatus): string {
  if (e.type === 'sensor.registered') return from === null ? 'registered' : 're-registered'
  if (e.type === 'status.changed' && e.data.status === to) {
    const why = e.data.reason ? `: ${e.data.reason}` : ''
    return `status changed to ${e.data.status}${why}`
  }
  if (from === null) return 'first seen'
  if (from === 'unknown') return 'seen again'
  return `seen (${to})`
}

/** A run of device events with no tick among them, or one tick. */
export type Segment =
  | { readonly tick: ProjectedEvent<ClockTicked> }
  | { readonly tick?: undefined; readonly events: readonly ProjectedEvent<DeviceEvent>[] }

/**
 * Splits a batch at its clock ticks, keeping stream order: device events between two ticks are
 * applied together, each tick on its own. Results never depend on where a batch was cut.
 */
export function splitAtTicks(events: readonly ProjectedEvent[]): Segment[] {
  const out: Segment[] = []
  let run: ProjectedEvent<DeviceEvent>[] = []
  for (const p of events) {
    if (p.event.type === 'clock.ticked') {
      if (run.length > 0) out.push({ events: run })
      run = []
      out.push({ tick: p as ProjectedEvent<ClockTicked> })
    } else {
      run.push(p as ProjectedEvent<DeviceEvent>)
    }
  }
  if (run.length > 0) out.push({ events: run })
  return out
}

/** Distinct device ids of a run, sorted (rows are locked in this order: no deadlocks). */
export function deviceIdsOf(events: readonly ProjectedEvent<DeviceEvent>[]): string[] {
  return [...new Set(events.map((e) => e.event.deviceId))].sort()
}
