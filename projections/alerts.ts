import { createHash } from 'node:crypto'
import { sql, type Transaction } from 'kysely'
import type { DeviceEvent } from '../schemas/events.ts'
import { fnv1a, notificationSubject } from '../schemas/subjects.ts'
import {
  byHlcThenId,
  foldRule,
  NEW_FOLD,
  type Condition,
  type FoldedAlert,
  type FoldInput,
  type FoldState,
} from './alert-evaluation.ts'
import type { AlertRule, AlertRules, ThresholdRule } from './alert-rules.ts'
import { copyPayload, copyText, type CopySend } from './copy-rows.ts'
import { jsonRows } from './json-rows.ts'
import { RowCache, transactionId } from './row-cache.ts'
import type { ProjectedEvent, Projection } from './projection.ts'
import type { EffectiveStatus } from './sensor-lifecycle.ts'
import { deviceIdsOf, SensorTracker, splitAtTicks, type Transition } from './sensor-tracker.ts'
import { textArray } from './text-array.ts'
import type {
  AlertHorizonTable,
  AlertInputTable,
  AlertTipTable,
  Database,
  NotificationOutboxTable,
} from './tables.ts'

export { alertId } from './alert-evaluation.ts'

export interface AlertsOptions {
  readonly rules: AlertRules
  /** Silence after which a sensor without its own timeout becomes unknown (as in sensor-status). */
  readonly defaultTimeoutSeconds: number
  /**
   * Readings kept per sensor and threshold rule beyond its horizon (at least twice the rule's
   * `consecutive`); a reading older than the kept ones that arrives late is not evaluated.
   */
  readonly windowReadings?: number
}

/** Default of {@link AlertsOptions.windowReadings}. */
export const WINDOW_READINGS = 64

type AlertRow = FoldedAlert
type OutboxRow = NotificationOutboxTable

/**
 * alerts: rules from the rules file, each (rule, sensor) folded in HLC order from what it depends
 * on, so that the alerts are a function of the set of events, not of the order they arrived in:
 *
 * - threshold / battery-low: raise after enough breaching readings (and time), resolve when the
 *   value crosses back over the clear level; a sensor in maintenance or decommissioned at that
 *   point of its history (`alert_sensors_timeline`) raises nothing;
 * - silent: raise when the sensor becomes unknown, resolve when it is heard from again;
 * - `alert.acknowledged` events (operator actions) acknowledge the alert open at their HLC.
 *
 * The readings and acknowledgements are kept in `alert_inputs`; a late one takes its place and the
 * sensor's rules are folded again, and the alerts and conditions that changed are rewritten. Only
 * a window of readings is kept per (sensor, rule): older ones are folded into `alert_horizons`.
 *
 * Each transition of an alert (raised, resolved) has one row in `notification_outbox`, its content
 * derived from the alert alone; the outbox relay publishes it once. When a refold changes or
 * removes a transition, a row not yet published is rewritten or deleted; one already published
 * stays as sent, and a `corrected` or `retracted` row follows it. Alert ids are derived from rule,
 * sensor and the raising event, so a replay produces the same ids.
 */
export function alertsProjection(opts: AlertsOptions): Projection {
  const tracker = new SensorTracker('alert_sensors', 'alerts', opts.defaultTimeoutSeconds)
  const folds = new RowCache<KeptFold>(CACHED_FOLDS)
  const rules = opts.rules.rules
  const thresholds = rules.filter((r): r is ThresholdRule => r.kind === 'threshold')
  const window = keptReadings(opts)

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
      'alert_inputs',
      'alert_horizons',
      'alert_tips',
      'notification_outbox',
      'projection_clocks',
    ],
    async apply(trx, events, copy) {
      for (const segment of splitAtTicks(events)) {
        if (segment.tick) {
          const silenced = await tracker.tick(trx, segment.tick)
          const devices = [...new Set(silenced.map((t) => t.deviceId))]
          await refold(trx, tracker, folds, rules, window, devices, [])
          continue
        }
        const sensors = await tracker.load(trx, segment.events)
        for (const p of segment.events) sensors.apply(p)
        const moved = await sensors.flush(trx)
        const added = await addInputs(trx, thresholds, segment.events, copy)
        const fed = new Set(added.map((i) => i.device_id))
        const devices = deviceIdsOf(segment.events).filter((d) => moved.includes(d) || fed.has(d))
        // A sensor whose history this segment left as it was is where it was: its status now.
        const settled = new Map(
          devices.filter((d) => !moved.includes(d)).map((d) => [d, sensors.status(d)]),
        )
        await refold(trx, tracker, folds, rules, window, devices, added, settled)
      }
    },
  }
}

/** The inputs a device event adds: a value per threshold rule it feeds, or an acknowledgement. */
export function inputsOf(rules: readonly ThresholdRule[], e: DeviceEvent): AlertInputTable[] {
  const row = (
    rule_id: string,
    kind: 'reading' | 'ack',
    value: number | null,
    alert_id: string | null,
    acknowledged_by: string | null,
  ): AlertInputTable => ({
    device_id: e.deviceId,
    rule_id,
    event_id: e.eventId,
    kind,
    hlc: e.hlc,
    correlation_id: e.correlationId,
    value,
    alert_id,
    acknowledged_by,
  })
  switch (e.type) {
    case 'reading.recorded': {
      const fed = feeding(rules).byMetric.get(e.data.metric)
      if (fed === undefined) return []
      const v = e.data.value
      return fed.map((r) => row(r.id, 'reading', v, null, null))
    }
    case 'heartbeat.received': {
      const v = e.data.batteryPercent
      if (v === undefined) return []
      return feeding(rules).battery.map((r) => row(r.id, 'reading', v, null, null))
    }
    case 'alert.acknowledged':
      return [row('', 'ack', null, e.data.alertId, e.data.by)]
    default:
      return []
  }
}

/** Which threshold rules a reading of a metric feeds, and which heartbeats feed. */
interface Feeding {
  readonly byMetric: ReadonlyMap<string, readonly ThresholdRule[]>
  readonly battery: readonly ThresholdRule[]
}

const feedings = new WeakMap<readonly ThresholdRule[], Feeding>()

/** {@link Feeding} of a rule list, worked out once per list (not a filter per event). */
function feeding(rules: readonly ThresholdRule[]): Feeding {
  let f = feedings.get(rules)
  if (f === undefined) {
    const byMetric = new Map<string, ThresholdRule[]>()
    for (const r of rules) byMetric.set(r.metric, [...(byMetric.get(r.metric) ?? []), r])
    f = { byMetric, battery: rules.filter((r) => r.includeHeartbeatBattery) }
    feedings.set(rules, f)
  }
  return f
}

/** Stores the segment's inputs; returns those that are new (a redelivered one changes nothing). */
async function addInputs(
  trx: Transaction<Database>,
  rules: readonly ThresholdRule[],
  events: readonly ProjectedEvent<DeviceEvent>[],
  copy: CopySend | undefined,
): Promise<AlertInputTable[]> {
  return storeInputs(
    trx,
    events.flatMap((p) => inputsOf(rules, p.event)),
    copy,
  )
}

/** Columns of `alert_inputs`, in the order the COPY sends them. */
export const INPUT_COLUMNS = [
  'device_id',
  'rule_id',
  'event_id',
  'kind',
  'hlc',
  'correlation_id',
  'value',
  'alert_id',
  'acknowledged_by',
] as const satisfies readonly (keyof AlertInputTable)[]

/**
 * Stores inputs and returns those that are new: by COPY when `copy` is given. An input stored
 * already (a redelivery, an event re-published outside the dedup window, one delivered twice in
 * the batch) fails the COPY; then they go by {@link insertInputs}, which keeps the stored one.
 *
 * Why COPY: it is the statement of the alerts' commits that costs Postgres most, and inputs are
 * only ever inserted. Measured (450k inputs of 3,000 sensors in 1,500-row transactions, the
 * table's primary key): 5.2-5.6 us of Postgres CPU per row instead of 9.7-9.9 for the insert.
 */
export async function storeInputs(
  trx: Transaction<Database>,
  rows: AlertInputTable[],
  copy: CopySend | undefined,
): Promise<AlertInputTable[]> {
  if (rows.length === 0) return []
  if (copy === undefined) return insertInputs(trx, rows)
  let added = rows
  await copyPayload(
    trx,
    copy,
    'alert_inputs',
    INPUT_COLUMNS,
    copyText(rows, INPUT_COLUMNS),
    async () => {
      added = await insertInputs(trx, rows)
    },
  )
  return added
}

/** {@link storeInputs} by an insert that skips the keys stored already. */
async function insertInputs(
  trx: Transaction<Database>,
  rows: AlertInputTable[],
): Promise<AlertInputTable[]> {
  // One JSON array of tuples: the column names are not repeated in every row (40% fewer bytes
  // to serialise, send and parse than json-rows.ts' objects; Postgres spends less per row too).
  // Read as jsonb, not json: json's ->> parses the element's text again for every field it takes
  // (9 here); jsonb parses it once. Measured: 4.5 us per row instead of 22 (1,500-row batches).
  // A correlation id that is the event's own (an event that starts its chain: every reading a
  // device sends) goes as null and is stored as the event id: ~40 bytes less per row.
  const tuples = rows.map((i) => [
    i.device_id,
    i.rule_id,
    i.event_id,
    i.kind,
    i.hlc,
    i.correlation_id === i.event_id ? null : i.correlation_id,
    i.value,
    i.alert_id,
    i.acknowledged_by,
  ])
  // Only a count comes back, and the keys stored only when some were known already (a
  // redelivery): returning a row per input cost ~2 us of node CPU per input to parse, measured.
  const [stored] = (
    await sql<{ n: number; fresh: [string, string, string][] | null }>`
      with fresh as (
        insert into alert_inputs (device_id, rule_id, event_id, kind, hlc, correlation_id, value,
          alert_id, acknowledged_by)
        select r->>0, r->>1, r->>2, r->>3, r->>4, coalesce(r->>5, r->>2), (r->>6)::float8, r->>7,
          r->>8
        from jsonb_array_elements(${JSON.stringify(tuples)}::jsonb) as r
        on conflict (device_id, rule_id, event_id) do nothing
        returning device_id, rule_id, event_id),
      stored as (select count(*)::integer as n from fresh)
      -- The keys are aggregated only when needed: CASE runs the subquery of the branch it takes.
      select n, case when n < ${rows.length}
        then (select json_agg(json_build_array(device_id, rule_id, event_id)) from fresh) end
        as fresh
      from stored`.execute(trx)
  ).rows
  if (stored === undefined || stored.n === rows.length) return rows
  const added = new Set((stored.fresh ?? []).map(([d, r, e]) => inputKey(d, r, e)))
  // `delete`: an event delivered twice in one batch is one input, as the insert made it.
  return rows.filter((i) => added.delete(inputKey(i.device_id, i.rule_id, i.event_id)))
}

/**
 * The reading inputs a sensor's rules fold on from its tip before they are folded again from their
 * horizons and the kept readings trimmed to the window: between the window and twice the window
 * per threshold rule (`fedRules` of them), fixed per sensor by the hash of its id that also picks
 * its partition, shifted so that the two are not one choice.
 *
 * Why per rule: the window is kept per rule, while the count is of the sensor's inputs, one per
 * reading and rule it feeds. Counted against the window alone, a sensor whose readings feed three
 * rules (temperature high and low, humidity) was folded again in full after a third of a window
 * per rule, and the trim found nothing past the window to prune. Measured with the bench's
 * readings (300k events over 3,000 sensors, 100 readings each, the alerts processor alone):
 * 15.8-16.8k ev/s, 48-51 us of node and 24-26 of Postgres CPU per event with those refolds,
 * 19.6-20.3k ev/s, 39-41 and 19 without.
 *
 * Why not the window for every sensor: sensors that report at one rate (a fleet, a replay, a
 * bench) then come due in the same batches. Measured with the bench's readings (10,000 sensors):
 * each trim came as a run of batches that each folded ~100k stored inputs again and deleted
 * ~576k rows (1.1 s of Postgres per batch); alone on a 700k backlog, the alerts processor's
 * commits had a p99 of 1,013 ms (max 1,656, 8 over 1 s) and its peak RSS was 241 MB. Spread:
 * p99 173 ms, max 238, peak RSS 173 MB, same CPU and time. Trimming after more than the window
 * also reads fewer stored inputs again per reading (1.7 on average instead of 2), for ~17% more
 * rows kept on average. The price: in a steady stream every batch pays its share of the trims.
 * In a 15-s round at 5,000 ev/s on a 1M backlog (the bench's 2-core VM, saturated), the processor
 * ended 26,550 events behind, against 6,965 with one trim point, whose bursts missed that round.
 */
export function trimAfter(deviceId: string, window: number, fedRules: number): number {
  return Math.max(1, fedRules) * (window + ((fnv1a(deviceId) >>> 8) % window))
}

function inputKey(deviceId: string, ruleId: string, eventId: string): string {
  return `${deviceId}\u0000${ruleId}\u0000${eventId}`
}

/** A horizon as stored: its state with dates as JSON. */
interface Horizon {
  readonly hlc: string
  readonly eventId: string
  readonly state: FoldState
}

/**
 * Where a sensor's rules stood after the fold this process wrote last (row-cache.ts, tagged by
 * its tip's version): its tip, and per rule its condition and open alert. Every transaction that
 * changes a sensor's conditions or alerts moves its tip.
 */
export interface KeptFold {
  readonly tip: AlertTipTable
  /**
   * Per rule, in the order of the rules folded: an array, not a Map by rule id (a Map's hash
   * table was ~300 of the ~1,000 bytes an entry held, in a heap snapshot at 10,000 sensors).
   */
  readonly states: readonly FoldState[]
}

/**
 * Sensors whose folds are kept between batches: the hot part of a fleet. With the sensor cache
 * beside it (sensor-tracker.ts) it held ~3 KB per sensor (the heap's live size after a 200k-event
 * run: 56 MB with 10,000 sensors, 24 MB without the caches), so at most ~80 MB.
 */
const CACHED_FOLDS = 25_000

/** No inputs: shared by every (sensor, rule) a batch feeds nothing. */
const NOTHING: readonly FoldInput[] = Object.freeze([])

/** Something folded, by its place in a sensor's history. */
interface Place {
  readonly hlc: string
  readonly eventId: string
}

/**
 * Folds the rules of some sensors on, and writes what changed: one query per table to read, one
 * statement per table to write, whatever the number of sensors and events.
 *
 * A sensor whose new inputs all come after everything folded for it so far (its tip), and whose
 * status history up to the tip is unchanged, is folded on from its current alerts and conditions
 * over the new inputs alone: the common case, events arriving in order. Any other sensor (a late
 * event, a late status change) is folded again from its horizons over its kept inputs.
 *
 * `held`: the kept inputs of every sensor folded again, held by the caller instead of stored (a
 * rebuild's bulk load, whose sensors have nothing stored yet): they are not read, and not pruned
 * from `alert_inputs`; the caller stores those past the horizons returned.
 *
 * Returns the horizons moved.
 */
export async function refold(
  trx: Transaction<Database>,
  tracker: SensorTracker,
  folds: RowCache<KeptFold>,
  rules: readonly AlertRule[],
  window: number,
  devices: readonly string[],
  added: readonly AlertInputTable[],
  settled: ReadonlyMap<string, EffectiveStatus | null> = new Map(),
  held?: ReadonlyMap<string, readonly AlertInputTable[]>,
): Promise<readonly AlertHorizonTable[]> {
  if (devices.length === 0) return []
  const sorted = [...devices].sort()
  const news = group(added, (i) => i.device_id)
  const versions = await sql<{ device_id: string; xmin: string }>`
    select device_id, xmin::text as xmin from alert_tips
    where device_id = any(${textArray(sorted)}::text[])`.execute(trx)
  const kept = new Map<string, KeptFold>()
  const missed: string[] = []
  for (const v of versions.rows) {
    const k = folds.take(v.device_id, v.xmin)
    if (k === undefined) missed.push(v.device_id)
    else kept.set(v.device_id, k)
  }
  const tips = new Map([...kept].map(([d, k]) => [d, k.tip]))
  if (missed.length > 0)
    for (const t of await trx
      .selectFrom('alert_tips')
      .selectAll()
      .where(sql<boolean>`device_id = any(${textArray(missed)}::text[])`)
      .execute())
      tips.set(t.device_id, t)
  const fedRules = Math.max(1, rules.filter((r) => r.kind === 'threshold').length)
  const onward = (d: string) => {
    const tip = tips.get(d)
    if (tip === undefined) return false
    const own = news.get(d) ?? []
    // Due for pruning: folded again in full, which gives the state where the horizon moves to.
    let fresh = 0
    for (const i of own) if (i.kind === 'reading') fresh++
    // The hash only once a trim can be due: trimAfter is never below the window per rule.
    const since = tip.readings_since_prune + fresh
    if (since >= window * fedRules && since >= trimAfter(d, window, fedRules)) return false
    for (const i of own) if (!afterPlace(i.hlc, i.event_id, tip.hlc, tip.event_id)) return false
    return true
  }
  // Folded on from the tip: computed once per sensor.
  const onwards = new Set(sorted.filter(onward))
  // Folded on without reading their history: it has not changed, and their status is known.
  const unchanged = new Set(sorted.filter((d) => settled.has(d) && onwards.has(d)))
  const histories = group(
    await tracker.histories(
      trx,
      sorted.filter((d) => !unchanged.has(d)),
    ),
    (t) => t.deviceId,
  )
  for (const h of histories.values()) h.sort(byHlcThenId)
  for (const d of unchanged) histories.set(d, [now(d, settled.get(d) ?? null)])
  const fast = new Set(
    sorted.filter((d) => {
      if (unchanged.has(d)) return true
      const tip = tips.get(d)
      if (tip === undefined || !onwards.has(d)) return false
      const at = { hlc: tip.hlc, eventId: tip.event_id }
      const history = histories.get(d) ?? []
      return digest(history.filter((t) => byHlcThenId(t, at) <= 0)) === tip.history
    }),
  )
  const slow = sorted.filter((d) => !fast.has(d))
  const slowIds = textArray(slow)
  // Read back: the fast ones this process has not kept.
  const quick = [...fast].filter((d) => !kept.has(d))

  const inputs =
    held ??
    group(
      slow.length === 0
        ? []
        : await trx
            .selectFrom('alert_inputs')
            .selectAll()
            .where(sql<boolean>`device_id = any(${slowIds}::text[])`)
            .execute(),
      (i) => i.device_id,
    )
  const horizons = new Map(
    (slow.length === 0
      ? []
      : await trx
          .selectFrom('alert_horizons')
          .selectAll()
          .where(sql<boolean>`device_id = any(${slowIds}::text[])`)
          .execute()
    ).map((h) => [key(h.device_id, h.rule_id), toHorizon(h)]),
  )
  const conditions = await storedConditions(
    trx,
    quick,
    quick.flatMap((d) => (news.get(d) ?? []).map((i) => i.event_id)),
  )
  // Slow: alerts before a horizon are final (but the one open there). Fast: the open ones.
  const read =
    slow.length === 0 && quick.length === 0
      ? []
      : (
          await sql<AlertRow>`
      select a.* from alerts a
      left join alert_horizons h on h.device_id = a.device_id and h.rule_id = a.rule_id
      where (a.device_id = any(${slowIds}::text[])
             and (h.hlc is null or a.raised_hlc >= h.hlc or a.state <> 'resolved'
                  or a.alert_id = h.state -> 'open' ->> 'alert_id'))
         or (a.device_id = any(${textArray(quick)}::text[]) and a.state <> 'resolved')
      order by a.alert_id for update of a`.execute(trx)
        ).rows
  for (const d of fast)
    for (const s of kept.get(d)?.states ?? []) if (s.open !== null) read.push(s.open)
  const loaded = read.filter((a) => {
    if (!rules.some((r) => r.id === a.rule_id)) return false
    if (fast.has(a.device_id)) return true
    const h = horizons.get(key(a.device_id, a.rule_id))
    return h === undefined || after(a, h) || a.alert_id === h.state.open?.alert_id
  })
  const unresolved = new Map(
    loaded.filter((a) => a.state !== 'resolved').map((a) => [key(a.device_id, a.rule_id), a]),
  )

  const wanted = new Map<string, AlertRow>()
  const written: Database['alert_conditions'][] = []
  const prune: AlertHorizonTable[] = []
  const newTips: AlertTipTable[] = []
  const ends = new Map<string, FoldState[]>()
  for (const deviceId of sorted) {
    const history = histories.get(deviceId) ?? []
    const isFast = fast.has(deviceId)
    const tip = tips.get(deviceId)
    const own = isFast ? (news.get(deviceId) ?? []) : (inputs.get(deviceId) ?? [])
    // One pass over the sensor's inputs: its acknowledgements, its readings by rule, its newest.
    const acks: FoldInput[] = []
    const readingsOf = new Map<string, AlertInputTable[]>()
    // The newest place as two strings: no object per input that is newer than the last.
    let newestHlc = tip?.hlc
    let newestId = tip?.event_id ?? ''
    for (const i of own) {
      if (i.kind === 'ack') acks.push(ackInput(i))
      else {
        const list = readingsOf.get(i.rule_id)
        if (list === undefined) readingsOf.set(i.rule_id, [i])
        else list.push(i)
      }
      if (newestHlc === undefined || afterPlace(i.hlc, i.event_id, newestHlc, newestId)) {
        newestHlc = i.hlc
        newestId = i.event_id
      }
    }
    for (const t of history)
      if (newestHlc === undefined || afterPlace(t.hlc, t.eventId, newestHlc, newestId)) {
        newestHlc = t.hlc
        newestId = t.eventId
      }
    const fromTip: Place | undefined = tip && { hlc: tip.hlc, eventId: tip.event_id }
    const keptStates = isFast ? kept.get(deviceId)?.states : undefined
    // Where each rule ends, kept for the next batch whichever way it was folded: a sensor folded
    // again in full (a trim, a late event) is folded on from here next time, not read back.
    const ended: FoldState[] = []
    ends.set(deviceId, ended)
    // Allocation-lean: this runs per sensor and rule of every batch (its own allocations were the
    // largest of the alerts processor's, ~3 KB per event), and most rules get nothing new.
    for (let r = 0; r < rules.length; r++) {
      const rule = rules[r] as AlertRule
      const keptState = keptStates?.[r]
      // The key only where something is looked up by it (not for a fold kept from the tip).
      const k = isFast && keptState !== undefined ? '' : key(deviceId, rule.id)
      // Where this fold starts: the tip (fast) or the horizon (slow).
      const from: Place | undefined = isFast ? fromTip : horizons.get(k)
      const start: FoldState = isFast
        ? (keptState ?? {
            condition: conditions.get(k) ?? NEW_FOLD.condition,
            open: unresolved.get(k) ?? null,
          })
        : (horizons.get(k)?.state ?? NEW_FOLD)
      const mine = rule.kind === 'silent' ? undefined : readingsOf.get(rule.id)
      const fed: readonly FoldInput[] =
        rule.kind === 'silent'
          ? silenceInputs(history)
          : mine === undefined
            ? NOTHING
            : readingInputs(mine, history)
      const folded =
        fed.length === 0 && acks.length === 0
          ? NOTHING
          : (acks.length === 0 ? fed : [...fed, ...acks])
              .filter((i) => from === undefined || byHlcThenId(i, from) > 0)
              .sort(byHlcThenId)
      // Folded on over nothing (most rules of a sensor in a batch: a reading feeds one metric's
      // rules): where it was, its open alert unchanged, its condition not written.
      if (isFast && folded.length === 0) {
        if (start.open !== null) wanted.set(start.open.alert_id, start.open)
        ended[r] = start
        continue
      }
      const out = foldRule(rule, deviceId, start, folded)
      for (const a of out.alerts) wanted.set(a.alert_id, a)
      ended[r] = out.states.at(-1) ?? start
      if (rule.kind !== 'threshold') continue
      const readings: number[] = []
      for (let n = 0; n < folded.length; n++) if (folded[n]?.kind === 'reading') readings.push(n)
      const lastReading = readings.at(-1)
      const end = lastReading !== undefined ? out.states[lastReading] : isFast ? undefined : start
      if (end === undefined || (!isFast && lastReading === undefined && !horizons.has(k))) continue
      // Past the window, the oldest readings go: the horizon moves to the state after them.
      const cut = readings[readings.length - window - 1]
      if (!isFast && cut !== undefined) {
        const at = folded[cut] as FoldInput
        prune.push({
          device_id: deviceId,
          rule_id: rule.id,
          hlc: at.hlc,
          event_id: at.eventId,
          state: out.states[cut],
        })
      }
      // Folded on: its row is as `start` says (kept, or read above), so only a change is written.
      if (isFast && sameBreach(start.condition, end.condition)) continue
      written.push({
        device_id: deviceId,
        rule_id: rule.id,
        consecutive: end.condition.consecutive,
        since_at: end.condition.sinceMs === null ? null : new Date(end.condition.sinceMs),
        since_hlc: end.condition.sinceHlc,
      })
    }
    if (newestHlc === undefined) continue
    newTips.push({
      device_id: deviceId,
      hlc: newestHlc,
      event_id: newestId,
      history: unchanged.has(deviceId) ? (tip?.history ?? '') : digest(history),
      // Fast: its inputs are the batch's new ones, each a reading or an acknowledgement.
      readings_since_prune: isFast
        ? (tip?.readings_since_prune ?? 0) + own.length - acks.length
        : 0,
    })
  }

  await writeAlerts(trx, loaded, wanted)
  await writeConditions(trx, written)
  await writeOutbox(trx, loaded, wanted)
  await writeTips(trx, newTips, tips)
  await writeHorizons(trx, prune, held === undefined)
  // Acks fold after the last reading change no condition: the last state is what was written.
  const me = await transactionId(trx)
  for (const tip of newTips) {
    const states = ends.get(tip.device_id)
    if (states !== undefined) folds.put(tip.device_id, me, { tip, states })
  }
  return prune
}

/** A stand-in history for a sensor whose history is unchanged: its status, from the start. */
function now(deviceId: string, status: EffectiveStatus | null): Transition {
  return {
    deviceId,
    from: null,
    to: status ?? 'unknown',
    eventId: '',
    streamSeq: 0,
    hlc: '',
    correlationId: '',
    causationId: null,
    at: new Date(0),
    reason: '',
  }
}

/** Whether (hlc, eventId) a comes after b: byHlcThenId(a, b) > 0 without the objects. */
export function afterPlace(aHlc: string, aId: string, bHlc: string, bId: string): boolean {
  return aHlc !== bHlc ? aHlc > bHlc : aId > bId
}

/** Whether two conditions are the same breach (or none): what `alert_conditions` stores of them. */
function sameBreach(a: Condition, b: Condition): boolean {
  return a.consecutive === b.consecutive && a.sinceMs === b.sinceMs && a.sinceHlc === b.sinceHlc
}

/**
 * The conditions of some sensors' threshold rules as stored, by {@link key}: a rule without a row is
 * not in a breach. Its newest reading evaluated (`lastHlc`, which is not stored) is the newest of
 * its kept readings but the batch's new ones (`fresh`, stored already and not folded yet), else
 * where its horizon stands: every other kept reading has been folded (readings older than the
 * horizon are not, but never newer than it), and the horizon's state is the fold's after the last
 * reading it cut.
 */
async function storedConditions(
  trx: Transaction<Database>,
  devices: readonly string[],
  fresh: readonly string[],
): Promise<Map<string, Condition>> {
  const out = new Map<string, Condition>()
  if (devices.length === 0) return out
  const ids = textArray(devices)
  const rows = (
    await sql<{
      device_id: string
      rule_id: string
      consecutive: number | null
      since_at: Date | null
      since_hlc: string | null
      last_hlc: string | null
    }>`
      with newest as (
        select device_id, rule_id, max(hlc collate "C") as hlc from alert_inputs
        where device_id = any(${ids}::text[]) and kind = 'reading'
          and not (event_id = any(${textArray(fresh)}::text[]))
        group by device_id, rule_id
        union all
        select device_id, rule_id, state -> 'condition' ->> 'lastHlc' from alert_horizons
        where device_id = any(${ids}::text[])),
      -- HLCs compare as strings in clock order: byte order, whatever the database's collation.
      last as (select device_id, rule_id, max(hlc collate "C") as hlc from newest group by 1, 2)
      select coalesce(c.device_id, l.device_id) as device_id,
             coalesce(c.rule_id, l.rule_id) as rule_id,
             c.consecutive, c.since_at, c.since_hlc, l.hlc as last_hlc
      from (select * from alert_conditions where device_id = any(${ids}::text[])) c
      full join last l on l.device_id = c.device_id and l.rule_id = c.rule_id`.execute(trx)
  ).rows
  for (const r of rows)
    out.set(key(r.device_id, r.rule_id), {
      consecutive: r.consecutive ?? 0,
      sinceMs: r.since_at?.getTime() ?? null,
      sinceHlc: r.since_hlc,
      lastHlc: r.last_hlc ?? '',
    })
  return out
}

/** What of a sensor's status history a fold has seen. */
function digest(history: readonly Transition[]): string {
  const h = createHash('sha256')
  for (const t of history)
    h.update(`${t.hlc}\u0000${t.eventId}\u0000${t.from ?? ''}\u0000${t.to}\u0001`)
  return h.digest('base64url')
}

/** A threshold rule's readings, each with whether the sensor was quiet at that point. */
function readingInputs(rows: readonly AlertInputTable[], history: readonly Transition[]) {
  const readings = rows.map((r) => ({ hlc: r.hlc, eventId: r.event_id, row: r })).sort(byHlcThenId)
  const out: FoldInput[] = []
  let h = 0
  let status: Transition['to'] | null = null
  for (const { row } of readings) {
    const at = { hlc: row.hlc, eventId: row.event_id }
    while (h < history.length && byHlcThenId(history[h] as Transition, at) <= 0) {
      status = (history[h] as Transition).to
      h++
    }
    out.push({
      kind: 'reading',
      eventId: row.event_id,
      hlc: row.hlc,
      correlationId: row.correlation_id,
      value: row.value ?? 0,
      quiet: status === 'maintenance' || status === 'decommissioned',
    })
  }
  return out
}

/** A silent rule's inputs: the sensor's folded status history into and out of `unknown`. */
function silenceInputs(history: readonly Transition[]): readonly FoldInput[] {
  let out: FoldInput[] | undefined // most sensors were never unknown: no array for them
  for (const t of history) {
    if (t.to === 'unknown')
      (out ??= []).push({
        kind: 'silenced',
        eventId: t.eventId,
        hlc: t.hlc,
        correlationId: t.correlationId,
        at: t.at,
      })
    else if (t.from === 'unknown')
      (out ??= []).push({ kind: 'heard', eventId: t.eventId, hlc: t.hlc })
  }
  return out ?? NOTHING
}

function ackInput(r: AlertInputTable): FoldInput {
  return {
    kind: 'ack',
    eventId: r.event_id,
    hlc: r.hlc,
    alertId: r.alert_id ?? '',
    by: r.acknowledged_by ?? '',
  }
}

/** Deletes alerts a late event undid, then writes the changed ones (resolutions first). */
async function writeAlerts(
  trx: Transaction<Database>,
  loaded: readonly AlertRow[],
  wanted: ReadonlyMap<string, AlertRow>,
): Promise<void> {
  const before = new Map(loaded.map((a) => [a.alert_id, a]))
  const gone = loaded.filter((a) => !wanted.has(a.alert_id)).map((a) => a.alert_id)
  if (gone.length > 0)
    await trx
      .deleteFrom('alerts')
      .where(sql<boolean>`alert_id = any(${textArray(gone)}::text[])`)
      .execute()
  const changed = [...wanted.values()]
    .filter((a) => {
      const b = before.get(a.alert_id)
      return b === undefined || canonical(b) !== canonical(a)
    })
    .sort((a, b) => (a.alert_id < b.alert_id ? -1 : 1))
  // Resolutions first: the partial unique index allows a new alert only once the old one is resolved.
  const resolved = changed.filter((a) => a.state === 'resolved')
  const others = changed.filter((a) => a.state !== 'resolved')
  for (const rows of [resolved, others]) {
    if (rows.length === 0) continue
    const src = jsonRows('alerts', rows)
    await trx
      .insertInto('alerts')
      .columns(src.columns)
      .expression(src.select)
      .onConflict((oc) =>
        oc
          .column('alert_id')
          .doUpdateSet(Object.fromEntries(ALERT_COLUMNS.map((c) => [c, sql.ref(`excluded.${c}`)]))),
      )
      .execute()
  }
}

/**
 * Stores the conditions folded: a row while a rule is in a breach (consecutive breaching readings
 * so far), none once it is not. Not the newest reading evaluated: it moves with every reading,
 * and the row would be rewritten each batch for every rule a reading feeds (measured at 1M events:
 * ~10 us of Postgres per event, for a condition that rarely changes); it is derived when needed
 * ({@link storedConditions}).
 */
async function writeConditions(
  trx: Transaction<Database>,
  conditions: readonly Database['alert_conditions'][],
): Promise<void> {
  const breaches = conditions.filter((c) => c.consecutive > 0)
  const cleared = conditions.filter((c) => c.consecutive === 0)
  if (cleared.length > 0)
    await sql`
      delete from alert_conditions c
      using jsonb_array_elements(${JSON.stringify(cleared.map((c) => [c.device_id, c.rule_id]))}::jsonb) as r
      where c.device_id = r->>0 and c.rule_id = r->>1`.execute(trx)
  if (breaches.length === 0) return
  // Tuples, not objects: see addInputs.
  const tuples = breaches.map((c) => [
    c.device_id,
    c.rule_id,
    c.consecutive,
    c.since_at?.toISOString() ?? null,
    c.since_hlc,
  ])
  await sql`
    insert into alert_conditions as c (device_id, rule_id, consecutive, since_at, since_hlc)
    select r->>0, r->>1, (r->>2)::integer, (r->>3)::timestamptz, r->>4
    from jsonb_array_elements(${JSON.stringify(tuples)}::jsonb) as r
    on conflict (device_id, rule_id) do update set consecutive = excluded.consecutive,
      since_at = excluded.since_at, since_hlc = excluded.since_hlc
    where (c.consecutive, c.since_at, c.since_hlc) is distinct from
      (excluded.consecutive, excluded.since_at, excluded.since_hlc)`.execute(trx)
}

/**
 * Brings the outbox in line with the folded alerts. Each transition has one row, `<alert>-raised`
 * or `<alert>-resolved`. Not yet published, it is rewritten or deleted as the fold changes; once
 * published it is what was sent, and a correction `<id>-c<n>` (kind `corrected`, or `retracted`
 * when the transition no longer happens) is added whenever the fold differs from what was last sent
 * for it. Rows are locked first, so the relay never sends one while it is being rewritten.
 */
async function writeOutbox(
  trx: Transaction<Database>,
  loaded: readonly AlertRow[],
  wanted: ReadonlyMap<string, AlertRow>,
): Promise<void> {
  const ids = [...new Set([...loaded.map((a) => a.alert_id), ...wanted.keys()])].sort()
  if (ids.length === 0) return
  const rows = await trx
    .selectFrom('notification_outbox')
    .selectAll()
    .where(sql<boolean>`alert_id = any(${textArray(ids)}::text[])`)
    .orderBy('notification_id')
    .forUpdate()
    .execute()
  const stored = new Map(rows.map((r) => [r.notification_id, r]))
  const corrections = group(
    rows.filter((r) => r.corrects !== null),
    (r) => r.corrects as string,
  )
  const want = new Map<string, OutboxRow>()
  for (const a of wanted.values())
    for (const n of notificationsOf(a)) want.set(n.notification_id, n)
  const originals = new Set([
    ...want.keys(),
    ...rows.filter((r) => r.corrects === null).map((r) => r.notification_id),
  ])
  const upsert: OutboxRow[] = []
  const remove: string[] = []
  for (const id of [...originals].sort()) {
    const target = want.get(id)
    const sent = stored.get(id)
    if (sent === undefined || sent.published_at === null) {
      if (target === undefined) remove.push(id)
      else if (sent === undefined || canonical(sent) !== canonical(target)) upsert.push(target)
      continue
    }
    const chain = (corrections.get(id) ?? []).sort((a, b) => seqOf(a) - seqOf(b))
    const published = chain.filter((c) => c.published_at !== null)
    const pending = chain.filter((c) => c.published_at === null)
    const last = published.at(-1) ?? sent
    const lastSays = last.kind === 'retracted' ? undefined : content(last.payload)
    const nowSays = target === undefined ? undefined : content(target.payload)
    if (lastSays === nowSays) {
      remove.push(...pending.map((c) => c.notification_id))
      continue
    }
    const next = correctionOf(sent, target ?? sent, target === undefined, published.length + 1)
    remove.push(
      ...pending
        .filter((c) => c.notification_id !== next.notification_id)
        .map((c) => c.notification_id),
    )
    const had = stored.get(next.notification_id)
    if (had === undefined || canonical(had) !== canonical(next)) upsert.push(next)
  }
  if (remove.length > 0)
    await trx
      .deleteFrom('notification_outbox')
      .where(sql<boolean>`notification_id = any(${textArray(remove)}::text[])`)
      .where('published_at', 'is', null)
      .execute()
  if (upsert.length > 0) {
    const src = jsonRows('notification_outbox', upsert)
    await trx
      .insertInto('notification_outbox')
      .columns(src.columns)
      .expression(src.select)
      .onConflict((oc) =>
        oc
          .column('notification_id')
          .doUpdateSet((eb) => ({
            kind: eb.ref('excluded.kind'),
            subject: eb.ref('excluded.subject'),
            payload: eb.ref('excluded.payload'),
            hlc: eb.ref('excluded.hlc'),
            corrects: eb.ref('excluded.corrects'),
          }))
          .where('notification_outbox.published_at', 'is', null),
      )
      .execute()
  }
}

/** The notifications of an alert's life cycle: raised, and resolved once it is. */
export function notificationsOf(a: AlertRow): OutboxRow[] {
  const out = [notification(a, 'raised', a.raised_hlc, a.raised_at)]
  if (a.state === 'resolved' && a.resolved_hlc !== null && a.resolved_at !== null)
    out.push(notification(a, 'resolved', a.resolved_hlc, a.resolved_at))
  return out
}

function notification(a: AlertRow, kind: 'raised' | 'resolved', hlc: string, at: Date): OutboxRow {
  const id = `${a.alert_id}-${kind}`
  return {
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
    corrects: null,
    published_at: null,
  }
}

/**
 * The n-th correction of a sent notification: what the transition is now (`corrected`), or that it
 * no longer happens (`retracted`, with what was sent).
 */
function correctionOf(sent: OutboxRow, now: OutboxRow, retracted: boolean, n: number): OutboxRow {
  const id = `${sent.notification_id}-c${n}`
  const payload = now.payload as Record<string, unknown>
  const kind = retracted ? 'retracted' : 'corrected'
  return {
    notification_id: id,
    alert_id: sent.alert_id,
    kind,
    subject: notificationSubject(String(payload.severity), String(payload.deviceId), id),
    payload: {
      ...payload,
      notificationId: id,
      kind,
      corrects: sent.notification_id,
      transition: sent.kind,
    },
    hlc: now.hlc,
    corrects: sent.notification_id,
    published_at: null,
  }
}

function seqOf(r: OutboxRow): number {
  return Number(/-c(\d+)$/.exec(r.notification_id)?.[1] ?? 0)
}

/** What a notification says about its transition (not which row says it). */
function content(payload: unknown): string {
  const {
    notificationId: _n,
    kind: _k,
    corrects: _c,
    transition: _t,
    ...rest
  } = payload as Record<string, unknown>
  return canonical(rest)
}

function after(a: AlertRow, h: Horizon): boolean {
  return byHlcThenId({ hlc: a.raised_hlc, eventId: a.raised_event_id }, h) > 0
}

function toHorizon(h: AlertHorizonTable): Horizon {
  const s = h.state as {
    condition: FoldState['condition']
    open: (Omit<AlertRow, 'raised_at' | 'acknowledged_at' | 'resolved_at'> & DateFields) | null
  }
  const date = (v: string | null) => (v === null ? null : new Date(v))
  const open: AlertRow | null =
    s.open === null
      ? null
      : {
          ...s.open,
          raised_at: new Date(s.open.raised_at),
          acknowledged_at: date(s.open.acknowledged_at),
          resolved_at: date(s.open.resolved_at),
        }
  return { hlc: h.hlc, eventId: h.event_id, state: { condition: s.condition, open } }
}

interface DateFields {
  raised_at: string
  acknowledged_at: string | null
  resolved_at: string | null
}

/** Moves each sensor's tip on (`before`: the tips as they were, to leave an unchanged digest out). */
async function writeTips(
  trx: Transaction<Database>,
  tips: readonly AlertTipTable[],
  before: ReadonlyMap<string, AlertTipTable>,
): Promise<void> {
  if (tips.length === 0) return
  // Tuples, not objects: see addInputs. A history digest as stored goes as null (in order, it
  // rarely changes): ~45 bytes less per sensor and batch.
  const tuples = tips.map((t) => [
    t.device_id,
    t.hlc,
    t.event_id,
    before.get(t.device_id)?.history === t.history ? null : t.history,
    t.readings_since_prune,
  ])
  // The insert's row must hold one (not null is checked before the conflict): '', which no
  // digest is, stands for "as stored" and is only ever sent for a tip that is stored.
  await sql`
    insert into alert_tips as t (device_id, hlc, event_id, history, readings_since_prune)
    select r->>0, r->>1, r->>2, coalesce(r->>3, ''), (r->>4)::integer
    from jsonb_array_elements(${JSON.stringify(tuples)}::jsonb) as r
    on conflict (device_id) do update set hlc = excluded.hlc, event_id = excluded.event_id,
      history = case when excluded.history = '' then t.history else excluded.history end,
      readings_since_prune = excluded.readings_since_prune`.execute(trx)
}

/** Moves horizons forward and drops the stored readings up to them (`stored`: there are some). */
async function writeHorizons(
  trx: Transaction<Database>,
  rows: readonly AlertHorizonTable[],
  stored: boolean,
): Promise<void> {
  if (rows.length === 0) return
  const src = jsonRows('alert_horizons', rows)
  await trx
    .insertInto('alert_horizons')
    .columns(src.columns)
    .expression(src.select)
    .onConflict((oc) =>
      oc.columns(['device_id', 'rule_id']).doUpdateSet((eb) => ({
        hlc: eb.ref('excluded.hlc'),
        event_id: eb.ref('excluded.event_id'),
        state: eb.ref('excluded.state'),
      })),
    )
    .execute()
  if (!stored) return
  await sql`
    delete from alert_inputs i using unnest(${rows.map((h) => h.device_id)}::text[],
      ${rows.map((h) => h.rule_id)}::text[], ${rows.map((h) => h.hlc)}::text[],
      ${rows.map((h) => h.event_id)}::text[]) as h(device_id, rule_id, hlc, event_id)
    where i.device_id = h.device_id and i.rule_id = h.rule_id and i.kind = 'reading'
      and (i.hlc < h.hlc collate "C"
           or (i.hlc = h.hlc collate "C" and i.event_id collate "C" <= h.event_id collate "C"))`.execute(
    trx,
  )
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

function group<T>(items: readonly T[], by: (t: T) => string): Map<string, T[]> {
  const out = new Map<string, T[]>()
  for (const i of items) {
    const k = by(i)
    const list = out.get(k) ?? []
    list.push(i)
    out.set(k, list)
  }
  return out
}

/** A stable rendering for comparing rows (dates as ISO strings, keys sorted). */
function canonical(v: unknown): string {
  return JSON.stringify(v, (_k, x: unknown) =>
    x !== null && typeof x === 'object' && !Array.isArray(x)
      ? Object.fromEntries(Object.entries(x).sort(([a], [b]) => (a < b ? -1 : 1)))
      : x,
  )
}

function key(deviceId: string, ruleId: string): string {
  return `${deviceId}\u0000${ruleId}`
}

/**
 * Readings {@link alertsProjection} keeps per sensor and threshold rule with `opts` (the `window`
 * its folds prune to): for a rebuild's bulk load (projections/alerts-bulk-load.ts), which folds
 * through {@link refold} as it does.
 */
export function keptReadings(opts: AlertsOptions): number {
  const thresholds = opts.rules.rules.filter((r): r is ThresholdRule => r.kind === 'threshold')
  return Math.max(
    opts.windowReadings ?? WINDOW_READINGS,
    ...thresholds.map((r) => 2 * r.consecutive),
  )
}
