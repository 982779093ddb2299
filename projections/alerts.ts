import { createHash } from 'node:crypto'
import { sql, type Transaction } from 'kysely'
import type { DeviceEvent } from '../schemas/events.ts'
import { notificationSubject } from '../schemas/subjects.ts'
import { evaluateThreshold, NEW_CONDITION, type Condition } from './alert-evaluation.ts'
import type { AlertRules, SilentRule, ThresholdRule } from './alert-rules.ts'
import type { ProjectedEvent, Projection } from './projection.ts'
import { hlcTime } from './sensor-lifecycle.ts'
import { deviceIdsOf, SensorTracker, splitAtTicks, type Transition } from './sensor-tracker.ts'
import type { AlertTable, Database, NotificationOutboxTable } from './tables.ts'

export interface AlertsOptions {
  readonly rules: AlertRules
  /** Silence after which a sensor without its own timeout becomes unknown (as in sensor-status). */
  readonly defaultTimeoutSeconds: number
}

type AlertRow = AlertTable

/**
 * alerts: rules from the rules file, evaluated in stream order.
 *
 * - threshold / battery-low: raise after enough breaching readings (and time), resolve when the
 *   value crosses back over the clear level; a reading is never evaluated twice;
 * - silent: raise when the sensor becomes unknown, resolve when it is heard from again;
 * - `alert.acknowledged` events (operator actions) acknowledge an open alert.
 *
 * Each raise and resolve writes a notification into `notification_outbox` in the same transaction;
 * the outbox relay publishes it once. Alert ids are derived from rule, sensor and the raising
 * event, so a replay produces the same ids.
 */
export function alertsProjection(opts: AlertsOptions): Projection {
  const tracker = new SensorTracker('alert_sensors', 'alerts', opts.defaultTimeoutSeconds)
  const thresholds = opts.rules.rules.filter((r): r is ThresholdRule => r.kind === 'threshold')
  const silent = opts.rules.rules.filter((r): r is SilentRule => r.kind === 'silent')

  return {
    name: 'alerts',
    handles: [
      'sensor.registered',
      'reading.recorded',
      'heartbeat.received',
      'status.changed',
      'alert.acknowledged',
      'clock.ticked',
    ],
    tables: [
      'alerts',
      'alert_conditions',
      'alert_sensors',
      'alert_sensors_timeline',
      'notification_outbox',
      'projection_clocks',
    ],
    async apply(trx, events) {
      for (const segment of splitAtTicks(events)) {
        const work = new AlertWork()
        if (segment.tick) {
          const silenced = await tracker.tick(trx, segment.tick)
          await work.load(trx, [...new Set(silenced.map((t) => t.deviceId))])
          for (const t of silenced) raiseSilent(work, silent, t)
          await work.flush(trx)
          continue
        }
        const devices = deviceIdsOf(segment.events)
        const sensors = await tracker.load(trx, segment.events)
        await work.load(trx, devices)
        for (const p of segment.events) {
          const t = sensors.apply(p)
          if (t?.to === 'unknown') raiseSilent(work, silent, t)
          else if (t?.from === 'unknown') resolveSilent(work, silent, t)
          const status = sensors.status(p.event.deviceId)
          const quiet = status === 'maintenance' || status === 'decommissioned'
          for (const [rule, value] of samples(thresholds, p.event))
            evaluate(work, rule, p, value, quiet)
          if (p.event.type === 'alert.acknowledged')
            acknowledge(
              work,
              p as ProjectedEvent<Extract<DeviceEvent, { type: 'alert.acknowledged' }>>,
            )
        }
        await sensors.flush(trx)
        await work.flush(trx)
      }
    },
  }
}

/** The threshold rules a device event feeds, with the value it feeds them. */
function samples(rules: readonly ThresholdRule[], e: DeviceEvent): [ThresholdRule, number][] {
  if (e.type === 'reading.recorded') {
    return rules.filter((r) => r.metric === e.data.metric).map((r) => [r, e.data.value])
  }
  if (e.type === 'heartbeat.received' && e.data.batteryPercent !== undefined) {
    const v = e.data.batteryPercent
    return rules.filter((r) => r.includeHeartbeatBattery).map((r) => [r, v])
  }
  return []
}

function evaluate(
  work: AlertWork,
  rule: ThresholdRule,
  p: ProjectedEvent<DeviceEvent>,
  value: number,
  quiet: boolean,
) {
  const e = p.event
  const open = work.unresolved(e.deviceId, rule.id)
  const before = work.condition(e.deviceId, rule.id)
  const { condition, verdict } = evaluateThreshold(
    rule,
    before,
    { value, atMs: hlcTime(e.hlc).getTime(), hlc: e.hlc },
    open !== undefined,
  )
  work.setCondition(e.deviceId, rule.id, condition)
  switch (verdict) {
    case 'raise':
      // A sensor in maintenance or decommissioned raises nothing; it may still resolve.
      if (quiet) return
      work.raise({
        rule,
        deviceId: e.deviceId,
        event: e,
        value,
        message:
          `${rule.metric} ${value} ${rule.direction === 'above' ? '>=' : '<='} ${rule.raiseAt}` +
          (rule.consecutive > 1 ? ` for ${rule.consecutive} readings` : '') +
          (rule.forSeconds > 0 ? ` over ${rule.forSeconds} s` : ''),
      })
      return
    case 'again':
      if (open)
        work.update({
          ...open,
          occurrences: open.occurrences + 1,
          last_occurrence_event_id: e.eventId,
        })
      return
    case 'resolve':
      if (open) work.resolve(open, e)
      return
    case 'none':
      return
  }
}

function raiseSilent(work: AlertWork, rules: readonly SilentRule[], t: Transition) {
  for (const rule of rules) {
    if (work.unresolved(t.deviceId, rule.id)) continue
    work.raise({
      rule,
      deviceId: t.deviceId,
      event: { eventId: t.eventId, hlc: t.hlc, correlationId: t.correlationId },
      at: t.at,
      value: null,
      message: 'no events within the inactivity timeout: status unknown',
    })
  }
}

function resolveSilent(work: AlertWork, rules: readonly SilentRule[], t: Transition) {
  for (const rule of rules) {
    const open = work.unresolved(t.deviceId, rule.id)
    if (open) work.resolve(open, { eventId: t.eventId, hlc: t.hlc })
  }
}

function acknowledge(
  work: AlertWork,
  p: ProjectedEvent<Extract<DeviceEvent, { type: 'alert.acknowledged' }>>,
) {
  const e = p.event
  const alert = work.byId(e.data.alertId)
  // Only an open alert of this sensor can be acknowledged; acknowledging again changes nothing.
  if (alert?.state !== 'open' || alert.device_id !== e.deviceId) return
  work.update({
    ...alert,
    state: 'acknowledged',
    acknowledged_at: hlcTime(e.hlc),
    acknowledged_hlc: e.hlc,
    acknowledged_by: e.data.by,
    acknowledged_event_id: e.eventId,
  })
}

/** Deterministic: the same rule, sensor and raising event give the same id on every replay. */
export function alertId(ruleId: string, deviceId: string, raisingEventId: string): string {
  return `al-${createHash('sha256').update(`${ruleId}\u0000${deviceId}\u0000${raisingEventId}`).digest('hex').slice(0, 20)}`
}

interface Raise {
  readonly rule: ThresholdRule | SilentRule
  readonly deviceId: string
  readonly event: { readonly eventId: string; readonly hlc: string; readonly correlationId: string }
  readonly at?: Date
  readonly value: number | null
  readonly message: string
}

/**
 * The alerts, conditions and notifications of one segment, in memory until flushed: loaded with
 * one query per table, written with one statement per table.
 */
class AlertWork {
  readonly #alerts = new Map<string, AlertRow>()
  readonly #open = new Map<string, string>() // device + rule -> alert id (not resolved)
  readonly #changed = new Set<string>()
  readonly #conditions = new Map<string, Condition & { dirty: boolean }>()
  readonly #outbox: NotificationOutboxTable[] = []

  async load(trx: Transaction<Database>, devices: readonly string[]): Promise<void> {
    if (devices.length === 0) return
    const alerts = await trx
      .selectFrom('alerts')
      .selectAll()
      .where(sql<boolean>`device_id = any(${devices}::text[])`)
      .where('state', '<>', 'resolved')
      .orderBy('alert_id')
      .forUpdate()
      .execute()
    for (const a of alerts) {
      this.#alerts.set(a.alert_id, a)
      this.#open.set(key(a.device_id, a.rule_id), a.alert_id)
    }
    const conditions = await trx
      .selectFrom('alert_conditions')
      .selectAll()
      .where(sql<boolean>`device_id = any(${devices}::text[])`)
      .execute()
    for (const c of conditions) {
      this.#conditions.set(key(c.device_id, c.rule_id), {
        consecutive: c.consecutive,
        sinceMs: c.since_at?.getTime() ?? null,
        sinceHlc: c.since_hlc,
        lastHlc: c.last_hlc,
        dirty: false,
      })
    }
  }

  unresolved(deviceId: string, ruleId: string): AlertRow | undefined {
    const id = this.#open.get(key(deviceId, ruleId))
    return id === undefined ? undefined : this.#alerts.get(id)
  }

  byId(id: string): AlertRow | undefined {
    return this.#alerts.get(id)
  }

  condition(deviceId: string, ruleId: string): Condition {
    return this.#conditions.get(key(deviceId, ruleId)) ?? NEW_CONDITION
  }

  setCondition(deviceId: string, ruleId: string, c: Condition): void {
    const before = this.#conditions.get(key(deviceId, ruleId))
    if (before && before.lastHlc === c.lastHlc && before.consecutive === c.consecutive) return
    this.#conditions.set(key(deviceId, ruleId), { ...c, dirty: true })
  }

  raise(r: Raise): void {
    const at = r.at ?? hlcTime(r.event.hlc)
    const row: AlertRow = {
      alert_id: alertId(r.rule.id, r.deviceId, r.event.eventId),
      device_id: r.deviceId,
      rule_id: r.rule.id,
      severity: r.rule.severity,
      state: 'open',
      message: r.message,
      value: r.value,
      raised_at: at,
      raised_hlc: r.event.hlc,
      raised_event_id: r.event.eventId,
      correlation_id: r.event.correlationId,
      acknowledged_at: null,
      acknowledged_hlc: null,
      acknowledged_by: null,
      acknowledged_event_id: null,
      resolved_at: null,
      resolved_hlc: null,
      resolved_event_id: null,
      occurrences: 1,
      last_occurrence_event_id: r.event.eventId,
    }
    this.#open.set(key(r.deviceId, r.rule.id), row.alert_id)
    this.update(row)
    this.#notify(row, 'raised', r.event.hlc, at)
  }

  resolve(alert: AlertRow, by: { readonly eventId: string; readonly hlc: string }): void {
    const at = hlcTime(by.hlc)
    const row: AlertRow = {
      ...alert,
      state: 'resolved',
      resolved_at: at,
      resolved_hlc: by.hlc,
      resolved_event_id: by.eventId,
    }
    this.#open.delete(key(alert.device_id, alert.rule_id))
    this.update(row)
    this.#notify(row, 'resolved', by.hlc, at)
  }

  update(row: AlertRow): void {
    this.#alerts.set(row.alert_id, row)
    this.#changed.add(row.alert_id)
  }

  #notify(a: AlertRow, kind: 'raised' | 'resolved', hlc: string, at: Date): void {
    const id = `${a.alert_id}-${kind}`
    this.#outbox.push({
      notification_id: id,
      alert_id: a.alert_id,
      kind,
      subject: notificationSubject(a.severity, a.device_id, id),
      payload: {
        notificationId: id,
        kind,
        alertId: a.alert_id,
        deviceId: a.device_id,
        ruleId: a.rule_id,
        severity: a.severity,
        message: a.message,
        value: a.value,
        at: at.toISOString(),
        hlc,
        raisedEventId: a.raised_event_id,
        correlationId: a.correlation_id,
      },
      hlc,
      published_at: null,
    })
  }

  async flush(trx: Transaction<Database>): Promise<void> {
    const alerts = [...this.#changed].sort().map((id) => this.#alerts.get(id) as AlertRow)
    if (alerts.length > 0) {
      // Resolutions first: the partial unique index allows a new alert only once the old one is resolved.
      const resolved = alerts.filter((a) => a.state === 'resolved')
      const others = alerts.filter((a) => a.state !== 'resolved')
      for (const rows of [...inChunks(resolved), ...inChunks(others)]) {
        await trx
          .insertInto('alerts')
          .values(rows)
          .onConflict((oc) =>
            oc
              .column('alert_id')
              .doUpdateSet(
                Object.fromEntries(ALERT_COLUMNS.map((c) => [c, sql.ref(`excluded.${c}`)])),
              ),
          )
          .execute()
      }
    }
    const dirty = [...this.#conditions.entries()].filter(([, c]) => c.dirty)
    for (const conditions of inChunks(dirty)) {
      await trx
        .insertInto('alert_conditions')
        .values(
          conditions.map(([k, c]) => {
            const [device_id = '', rule_id = ''] = k.split('\u0000')
            return {
              device_id,
              rule_id,
              consecutive: c.consecutive,
              since_at: c.sinceMs === null ? null : new Date(c.sinceMs),
              since_hlc: c.sinceHlc,
              last_hlc: c.lastHlc,
            }
          }),
        )
        .onConflict((oc) =>
          oc.columns(['device_id', 'rule_id']).doUpdateSet((eb) => ({
            consecutive: eb.ref('excluded.consecutive'),
            since_at: eb.ref('excluded.since_at'),
            since_hlc: eb.ref('excluded.since_hlc'),
            last_hlc: eb.ref('excluded.last_hlc'),
          })),
        )
        .execute()
    }
    for (const notifications of inChunks(this.#outbox)) {
      await trx
        .insertInto('notification_outbox')
        .values(notifications.map((n) => ({ ...n, payload: JSON.stringify(n.payload) })))
        .onConflict((oc) => oc.column('notification_id').doNothing())
        .execute()
    }
  }
}

/**
 * Every column of `alerts` but its key, all of them (or this does not compile): what the upsert of
 * a changed alert sets.
 */
const ALERT_COLUMNS = Object.keys({
  device_id: true,
  rule_id: true,
  severity: true,
  state: true,
  message: true,
  value: true,
  raised_at: true,
  raised_hlc: true,
  raised_event_id: true,
  correlation_id: true,
  acknowledged_at: true,
  acknowledged_hlc: true,
  acknowledged_by: true,
  acknowledged_event_id: true,
  resolved_at: true,
  resolved_hlc: true,
  resolved_event_id: true,
  occurrences: true,
  last_occurrence_event_id: true,
} satisfies Record<Exclude<keyof AlertRow, 'alert_id'>, true>)

/**
 * A multi-row statement binds a parameter per column per row, and the wire protocol counts them
 * in 16 bits: a mass silence of ~10,000 sensors once overflowed it. Rows go in chunks that stay
 * far below (the widest table here, alerts, has 20 columns).
 */
const ROWS_PER_STATEMENT = 1000

function inChunks<T>(rows: readonly T[]): T[][] {
  const chunks: T[][] = []
  for (let i = 0; i < rows.length; i += ROWS_PER_STATEMENT) {
    chunks.push(rows.slice(i, i + ROWS_PER_STATEMENT))
  }
  return chunks
}

function key(deviceId: string, ruleId: string): string {
  return `${deviceId}\u0000${ruleId}`
}
