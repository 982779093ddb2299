import { sql, type Transaction } from 'kysely'
import type { ClockTicked, DeviceEvent } from '../schemas/events.ts'
import { jsonRows } from './json-rows.ts'
import { RowCache, transactionId } from './row-cache.ts'
import type { ProjectedEvent } from './projection.ts'
import {
  effectiveStatus,
  hlcTime,
  NEW_SENSOR,
  observe,
  type EffectiveStatus,
  type SensorLifecycle,
} from './sensor-lifecycle.ts'
import type { Database, SensorStateTable, SensorTimelineTable } from './tables.ts'
import { textArray } from './text-array.ts'

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
  /** Its timeline points, by event id; `timelineDirty` when one was added or changed. */
  points: Map<string, Point>
  timelineDirty: boolean
  /** Its status when loaded. */
  loadedStatus: EffectiveStatus | null
  /** It has a row (read or written). */
  stored: boolean
  /** A column other than its last seen ones changed since its row was read or written. */
  wide: boolean
}

/** Sensors kept between batches: the hot part of a fleet (see CACHED_FOLDS in alerts.ts). */
const CACHED_SENSORS = 25_000

/** A row of `<table>_timeline`. */
type Point = SensorTimelineTable

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
   * The sensors this process wrote last, as written (row-cache.ts): a batch reads back only the
   * ones another transaction changed since. An entry is taken out while its batch changes it, and
   * put back once the batch has written it.
   */
  readonly #cache = new RowCache<Tracked>(CACHED_SENSORS)

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
    const tracked = new Map<string, Tracked>()
    if (deviceIds.length > 0) {
      const versions = (
        await sql<{ device_id: string; xmin: string }>`select device_id, xmin::text as xmin
          from ${sql.table(this.table)} where device_id = any(${textArray(deviceIds)}::text[])
          order by device_id for update`.execute(trx)
      ).rows
      const misses: string[] = []
      for (const v of versions) {
        const kept = this.#cache.take(v.device_id, v.xmin)
        if (kept === undefined) misses.push(v.device_id)
        else {
          // Taken out of the cache: this batch's alone until it puts it back (no copy made).
          kept.loadedStatus = kept.status
          tracked.set(v.device_id, kept)
        }
      }
      if (misses.length > 0) {
        const rows = (
          await sql<SensorStateTable>`select * from ${sql.table(this.table)}
            where device_id = any(${textArray(misses)}::text[])`.execute(trx)
        ).rows
        for (const r of rows) tracked.set(r.device_id, fromRow(r))
        for (const [deviceId, points] of await this.points(trx, misses)) {
          const t = tracked.get(deviceId)
          if (t) t.points = points
        }
      }
    }
    return new TrackerSegment(this, tracked, await this.now(trx, partitions), this.#cache)
  }

  /** `<table>_timeline`: what each sensor's status timeline is folded from. */
  get timeline(): 'sensor_status_timeline' | 'alert_sensors_timeline' {
    return this.table === 'sensor_status' ? 'sensor_status_timeline' : 'alert_sensors_timeline'
  }

  /** The timeline points of some sensors. */
  async points(
    trx: Transaction<Database>,
    deviceIds: readonly string[],
  ): Promise<Map<string, Map<string, Point>>> {
    const out = new Map<string, Map<string, Point>>()
    if (deviceIds.length === 0) return out
    const rows = await trx
      .selectFrom(this.timeline)
      .selectAll()
      .where(sql<boolean>`device_id = any(${textArray(deviceIds)}::text[])`)
      .execute()
    for (const r of rows) {
      const m = out.get(r.device_id) ?? new Map<string, Point>()
      m.set(r.event_id, r) // int8 comes back as a number (infra/database.ts)
      out.set(r.device_id, m)
    }
    return out
  }

  /**
   * Each sensor's status history as folded from its timeline in HLC order (see
   * {@link foldTimeline}), with the row's current status reconciled.
   */
  async histories(trx: Transaction<Database>, deviceIds: readonly string[]): Promise<Transition[]> {
    if (deviceIds.length === 0) return []
    const points = await this.points(trx, deviceIds)
    const rows = (
      await sql<SensorStateTable>`select * from ${sql.table(this.table)}
        where device_id = any(${textArray(deviceIds)}::text[])`.execute(trx)
    ).rows
    return rows.flatMap((r) => {
      const t = { ...fromRow(r), points: points.get(r.device_id) ?? new Map<string, Point>() }
      return reconcile(r.device_id, foldTimeline(r.device_id, t.points), t)
    })
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
    // Rewritten by the transaction their entries may be tagged with: the tag cannot tell.
    for (const r of silenced.rows) this.#cache.drop(r.device_id)
    const marks = silenced.rows.map((r) => ({
      device_id: r.device_id,
      event_id: e.event.eventId,
      kind: 'silent' as const,
      hlc: e.event.hlc,
      at,
      status: null,
      note: null,
      correlation_id: e.event.correlationId,
      causation_id: e.event.causationId ?? null,
      stream_seq: e.streamSeq,
      again_event_id: null,
      again_hlc: null,
      again_correlation_id: null,
      again_causation_id: null,
      again_stream_seq: null,
    }))
    if (marks.length > 0) {
      const src = jsonRows(this.timeline, marks)
      await trx
        .insertInto(this.timeline)
        .columns(src.columns)
        .expression(src.select)
        .onConflict((oc) => oc.columns(['device_id', 'event_id']).doNothing())
        .execute()
    }
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
    /** Where the sensors go once written. */
    private readonly cache: RowCache<Tracked>,
  ) {}

  /** Folds one event in; returns the status change it caused, if any. */
  apply(p: ProjectedEvent<DeviceEvent>): Transition | undefined {
    const e = p.event
    // An operator action, not a sign of life: it neither creates a sensor nor changes one.
    if (e.type === 'alert.acknowledged') return undefined
    const t = this.sensors.get(e.deviceId) ?? newTracked()
    this.sensors.set(e.deviceId, t)
    if (addPoint(t.points, p)) {
      t.timelineDirty = true
      t.dirty = true
    }
    const lifecycle = observe(t.lifecycle, e)
    if (lifecycle === t.lifecycle && t.status !== null) return undefined
    if (!onlySeenMoved(t.lifecycle, lifecycle) || t.partition !== (p.partition ?? null))
      t.wide = true
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
    t.wide = true
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

  /**
   * Writes every changed sensor back in one statement, its current status named by the event that
   * began its current run in HLC order. Returns the sensors whose timeline changed.
   */
  async flush(trx: Transaction<Database>): Promise<string[]> {
    const rows = [...this.sensors.entries()].filter(([, t]) => t.dirty && t.status !== null)
    if (rows.length === 0) return []
    const changed = rows.filter(([, t]) => moved(t)).map(([id]) => id)
    for (const [id, t] of rows) {
      // Its points and status as loaded (most sensors of a batch: only their last seen moved):
      // the fold is a function of those and of the status fields the flush that wrote them set
      // from this same fold (a tick sets what the fold of its silent point gives), so it would
      // give them again. Not folded: ~0.6 KB of garbage per event in sensor-status and alerts.
      if (!moved(t)) continue
      const history = reconcile(id, foldTimeline(id, t.points), t)
      const last = history.at(-1)
      if (last === undefined) continue
      if (
        t.statusHlc !== last.hlc ||
        t.statusEventId !== last.eventId ||
        t.statusCorrelationId !== last.correlationId ||
        t.statusChangedAt?.getTime() !== last.at.getTime()
      )
        t.wide = true
      t.statusHlc = last.hlc
      t.statusEventId = last.eventId
      t.statusCorrelationId = last.correlationId
      t.statusChangedAt = last.at
    }
    const points = rows
      .filter(([, t]) => t.timelineDirty)
      .flatMap(([, t]) => [...t.points.values()])
    if (points.length > 0) {
      const src = jsonRows(
        this.tracker.timeline,
        points.map((x) => ({ ...x, at: x.at.toISOString() })),
      )
      await trx
        .insertInto(this.tracker.timeline)
        .columns(src.columns)
        .expression(src.select)
        .onConflict((oc) =>
          oc.columns(['device_id', 'event_id']).doUpdateSet((eb) => ({
            again_event_id: eb.ref('excluded.again_event_id'),
            again_hlc: eb.ref('excluded.again_hlc'),
            again_correlation_id: eb.ref('excluded.again_correlation_id'),
            again_causation_id: eb.ref('excluded.again_causation_id'),
            again_stream_seq: eb.ref('excluded.again_stream_seq'),
          })),
        )
        .execute()
    }
    // A sensor has one `first` point: the earliest reading or heartbeat; earlier ones replace it.
    const firsts = points.filter((x) => x.kind === 'first')
    if (firsts.length > 0) {
      await trx
        .deleteFrom(this.tracker.timeline)
        .where('kind', '=', 'first')
        .where(sql<boolean>`device_id = any(${textArray(firsts.map((x) => x.device_id))}::text[])`)
        .where(
          sql<boolean>`not (event_id = any(${textArray(firsts.map((x) => x.event_id))}::text[]))`,
        )
        .execute()
    }
    const written = ([id, t]: [string, Tracked]): Written => {
      const l = t.lifecycle
      return {
        device_id: id,
        status: t.status,
        status_hlc: t.statusHlc,
        status_event_id: t.statusEventId,
        status_correlation_id: t.statusCorrelationId,
        status_changed_at: t.statusChangedAt?.toISOString() ?? null,
        last_seen_at: lastSeenAt(l),
        last_seen_hlc: l.lastSeenHlc,
        last_seen_event_id: l.lastSeenEventId,
        site: l.site,
        model: l.model,
        firmware: l.firmware,
        inactivity_timeout_seconds: l.inactivityTimeoutSeconds,
        registered_hlc: l.registeredHlc,
        registered_event_id: l.registeredEventId,
        decommissioned_hlc: l.decommissionedHlc,
        declared_status: l.declaredStatus,
        declared_hlc: l.declaredHlc,
        declared_event_id: l.declaredEventId,
        partition: t.partition,
      }
    }
    // Most sensors only moved their last seen event: those get a narrow update (a fifth of the
    // bytes to serialise, send and parse; its tuple built without the whole row), the others the
    // whole row.
    const seen: SeenRow[] = []
    const whole: Written[] = []
    for (const row of rows) {
      const [id, t] = row
      const l = t.lifecycle
      if (t.stored && !t.wide) seen.push([id, lastSeenAt(l), l.lastSeenHlc, l.lastSeenEventId])
      else whole.push(written(row))
      t.stored = true
      t.wide = false
    }
    if (seen.length > 0) {
      // The rows are there: load() locked them (a sensor is never deleted).
      await sql`update ${sql.table(this.tracker.table)} as s
        set last_seen_at = j.last_seen_at, last_seen_hlc = j.last_seen_hlc,
          last_seen_event_id = j.last_seen_event_id
        from (select r->>0 as device_id, (r->>1)::timestamptz as last_seen_at,
                r->>2 as last_seen_hlc, r->>3 as last_seen_event_id
              from jsonb_array_elements(${JSON.stringify(seen)}::jsonb) as r) as j
        where s.device_id = j.device_id`.execute(trx)
    }
    if (whole.length > 0) {
      // One JSON parameter, not twenty arrays: cheaper to serialise and to bind (json-rows.ts).
      const src = jsonRows(this.tracker.table, whole)
      await trx
        .insertInto(this.tracker.table)
        .columns(src.columns)
        .expression(src.select)
        .onConflict((oc) =>
          oc
            .column('device_id')
            .doUpdateSet(
              Object.fromEntries(STATE_COLUMNS.map((c) => [c, sql.ref(`excluded.${c}`)])),
            ),
        )
        .execute()
    }
    const me = await transactionId(trx)
    for (const [id, t] of rows) {
      t.dirty = false
      t.timelineDirty = false
      this.cache.put(id, me, t)
    }
    return changed
  }
}

/**
 * A sensor state row as written: the columns a sensor not yet fully seen may leave null, dates as
 * ISO strings (a Date's toJSON takes JSON.stringify off its fast path: 3x the time per row).
 */
type Written = {
  [K in keyof SensorStateTable]:
    (SensorStateTable[K] extends Date ? string : SensorStateTable[K]) | null
}

/** `last_seen_at` as written: the wall time of its last seen HLC. */
function lastSeenAt(l: SensorLifecycle): string | null {
  return l.lastSeenHlc === null ? null : hlcTime(l.lastSeenHlc).toISOString()
}

/**
 * What the narrow update of a sensor that was only seen again sets, as a tuple: device_id,
 * last_seen_at, last_seen_hlc, last_seen_event_id (no column names repeated in every row).
 */
type SeenRow = (string | null)[]

/** What a sensor's lifecycle says of when it was last seen: the rest is the wide part of its row. */
const SEEN_KEYS: ReadonlySet<string> = new Set<keyof SensorLifecycle>([
  'lastSeenHlc',
  'lastSeenEventId',
])

/**
 * Whether `after` differs from `before` in when it was last seen alone (or not at all). Every other
 * field is compared, so a field added to the lifecycle is never left out of the narrow update.
 */
function onlySeenMoved(before: SensorLifecycle, after: SensorLifecycle): boolean {
  // for-in, not Object.keys: no array per sensor and batch (a lifecycle is a plain object).
  for (const k in after) {
    const key = k as keyof SensorLifecycle
    if (!SEEN_KEYS.has(key) && before[key] !== after[key]) return false
  }
  return true
}

/** Every column of a sensor state table but its key: what the upsert of a changed sensor sets. */
const STATE_COLUMNS = Object.keys({
  status: true,
  status_hlc: true,
  status_event_id: true,
  status_correlation_id: true,
  status_changed_at: true,
  last_seen_at: true,
  last_seen_hlc: true,
  last_seen_event_id: true,
  site: true,
  model: true,
  firmware: true,
  inactivity_timeout_seconds: true,
  registered_hlc: true,
  registered_event_id: true,
  decommissioned_hlc: true,
  declared_status: true,
  declared_hlc: true,
  declared_event_id: true,
  partition: true,
} satisfies Record<Exclude<keyof SensorStateTable, 'device_id'>, true>)

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
    points: new Map(),
    timelineDirty: false,
    loadedStatus: null,
    stored: false,
    wide: false,
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
    points: new Map(),
    timelineDirty: false,
    loadedStatus: r.status,
    stored: true,
    wide: false,
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

/** Whether a sensor's timeline or status moved since it was loaded. */
function moved(t: Tracked): boolean {
  return t.timelineDirty || t.status !== t.loadedStatus
}

/** Distinct device ids of a run, sorted (rows are locked in this order: no deadlocks). */
export function deviceIdsOf(events: readonly ProjectedEvent<DeviceEvent>[]): string[] {
  return [...new Set(events.map((e) => e.event.deviceId))].sort()
}

/** (hlc, event id) of a before (b, c): the order of a sensor's timeline. */
function before(aHlc: string, aId: string, bHlc: string, bId: string): boolean {
  return aHlc < bHlc || (aHlc === bHlc && aId < bId)
}

/**
 * Adds what an event means to a sensor's timeline points; true if they changed. Registrations and
 * status changes are points of their own; of readings and heartbeats only the earliest (`first`)
 * and, for each silence, the earliest one after it (its `again_*`) matter.
 */
function addPoint(points: Map<string, Point>, p: ProjectedEvent<DeviceEvent>): boolean {
  const e = p.event
  const point = (kind: Point['kind'], status: string | null, note: string | null): Point => ({
    device_id: e.deviceId,
    event_id: e.eventId,
    kind,
    hlc: e.hlc,
    at: hlcTime(e.hlc),
    status,
    note,
    correlation_id: e.correlationId,
    causation_id: e.causationId ?? null,
    stream_seq: p.streamSeq,
    again_event_id: null,
    again_hlc: null,
    again_correlation_id: null,
    again_causation_id: null,
    again_stream_seq: null,
  })
  if (points.has(e.eventId)) return false
  switch (e.type) {
    case 'sensor.registered':
      points.set(e.eventId, point('registered', null, null))
      return true
    case 'status.changed':
      points.set(e.eventId, point('status', e.data.status, e.data.reason ?? null))
      return true
    case 'reading.recorded':
    case 'heartbeat.received': {
      let changed = false
      let first: Point | undefined
      for (const x of points.values())
        if (x.kind === 'first') {
          first = x
          break
        }
      if (first === undefined || before(e.hlc, e.eventId, first.hlc, first.event_id)) {
        if (first) points.delete(first.event_id)
        points.set(e.eventId, point('first', null, null))
        changed = true
      }
      for (const [id, s] of points) {
        if (s.kind !== 'silent' || !before(s.hlc, s.event_id, e.hlc, e.eventId)) continue
        if (s.again_hlc !== null && s.again_event_id !== null)
          if (!before(e.hlc, e.eventId, s.again_hlc, s.again_event_id)) continue
        points.set(id, {
          ...s,
          again_event_id: e.eventId,
          again_hlc: e.hlc,
          again_correlation_id: e.correlationId,
          again_causation_id: e.causationId ?? null,
          again_stream_seq: p.streamSeq,
        })
        changed = true
      }
      return changed
    }
    default:
      return false
  }
}

/**
 * A sensor's status history from its timeline points folded in HLC order: what the history would
 * be had every event arrived in HLC order. Each transition names the event that began the run of
 * its status, so the current status names the earliest event of its current uninterrupted run.
 * A late event in the middle of a run moves the run's start if it is earlier; one that splits a
 * run adds the transitions it causes and a new start for the rest of the run.
 */
export function foldTimeline(
  deviceId: string,
  points: ReadonlyMap<string, Point> | undefined,
): Transition[] {
  interface Item {
    readonly kind: Point['kind'] | 'again'
    readonly point: Point
    readonly eventId: string
    readonly hlc: string
    readonly at: Date
    readonly correlationId: string
    readonly causationId: string | null
    readonly streamSeq: number
  }
  const items: Item[] = []
  for (const pt of points?.values() ?? []) {
    items.push({
      kind: pt.kind,
      point: pt,
      eventId: pt.event_id,
      hlc: pt.hlc,
      at: pt.at,
      correlationId: pt.correlation_id,
      causationId: pt.causation_id,
      streamSeq: pt.stream_seq,
    })
    if (pt.kind === 'silent' && pt.again_event_id !== null && pt.again_hlc !== null) {
      items.push({
        kind: 'again',
        point: pt,
        eventId: pt.again_event_id,
        hlc: pt.again_hlc,
        at: hlcTime(pt.again_hlc),
        correlationId: pt.again_correlation_id ?? '',
        causationId: pt.again_causation_id,
        streamSeq: pt.again_stream_seq ?? 0,
      })
    }
  }
  items.sort((a, b) => (before(a.hlc, a.eventId, b.hlc, b.eventId) ? -1 : 1))
  let registered: string | null = null
  let decommissioned: string | null = null
  let declared: { status: EffectiveStatus; hlc: string } | null = null
  let silenced = false
  let status: EffectiveStatus | null = null
  const out: Transition[] = []
  for (const it of items) {
    if (it.kind === 'registered') registered = it.hlc
    if (it.kind === 'status') {
      if (it.point.status === 'decommissioned') decommissioned = it.hlc
      else declared = { status: it.point.status as EffectiveStatus, hlc: it.hlc }
    }
    if (it.kind === 'silent') {
      if (status === null) continue
      silenced = true
    } else {
      silenced = false
    }
    const base: EffectiveStatus =
      decommissioned !== null && (registered === null || decommissioned > registered)
        ? 'decommissioned'
        : declared !== null && (registered === null || declared.hlc > registered)
          ? declared.status
          : 'active'
    const to: EffectiveStatus = base === 'active' && silenced ? 'unknown' : base
    if (to === status) continue
    let reason: string
    if (it.kind === 'registered') reason = status === null ? 'registered' : 're-registered'
    else if (it.kind === 'status' && it.point.status === to)
      reason = `status changed to ${to}${it.point.note ? `: ${it.point.note}` : ''}`
    else if (it.kind === 'silent') reason = 'silent'
    else if (status === null) reason = 'first seen'
    else if (status === 'unknown') reason = 'seen again'
    else reason = `seen (${to})`
    out.push({
      deviceId,
      from: status,
      to,
      eventId: it.eventId,
      streamSeq: it.streamSeq,
      hlc: it.hlc,
      correlationId: it.correlationId,
      causationId: it.causationId,
      at: it.at,
      reason,
    })
    status = to
  }
  return out
}

/**
 * The folded history, made to end in the status the sensor has. They differ only where silence is
 * judged by what had arrived when a tick was applied (README, "Guarantees"): then the history ends
 * with the transition the sensor's row names.
 */
function reconcile(deviceId: string, history: Transition[], t: Tracked): Transition[] {
  const last = history.at(-1)
  if (t.status === null || (last !== undefined && last.to === t.status)) return history
  if (t.statusEventId === null || t.statusHlc === null || t.statusChangedAt === null) return history
  const from = last?.to ?? null
  const to = t.status
  const synthesized: Transition = {
    deviceId,
    from,
    to,
    eventId: t.statusEventId,
    streamSeq: t.points.get(t.statusEventId)?.stream_seq ?? 0,
    hlc: t.statusHlc,
    correlationId: t.statusCorrelationId ?? '',
    causationId: null,
    at: t.statusChangedAt,
    reason:
      to === 'unknown'
        ? 'silent'
        : from === null
          ? 'first seen'
          : from === 'unknown'
            ? 'seen again'
            : `seen (${to})`,
  }
  return [...history.filter((h) => h.eventId !== t.statusEventId), synthesized]
}
