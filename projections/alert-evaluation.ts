import { createHash } from 'node:crypto'
import type { SilentRule, ThresholdRule } from './alert-rules.ts'
import { checkedHlcWallMs } from '../schemas/hlc.ts'
import { hlcTime } from './sensor-lifecycle.ts'
import type { AlertTable } from './tables.ts'

/** Where a threshold rule stands for one sensor. */
export interface Condition {
  /** Breaching readings in a row so far. */
  readonly consecutive: number
  /** Event time (ms) of the first breaching reading of the run. */
  readonly sinceMs: number | null
  readonly sinceHlc: string | null
  /** Newest reading evaluated. */
  readonly lastHlc: string
}

export interface Sample {
  readonly value: number
  /** Event time: the reading's HLC wall time. */
  readonly atMs: number
  readonly hlc: string
}

/**
 * - `raise`: the breach is long enough to open an alert;
 * - `again`: a further breaching reading while the alert is not resolved;
 * - `resolve`: the value crossed back over the clear level (hysteresis);
 * - `none`: nothing to do, including a repeated or late reading, which is never evaluated twice.
 */
export type Verdict = 'raise' | 'again' | 'resolve' | 'none'

/** Before the first reading: '' sorts before every HLC. */
export const NEW_CONDITION: Condition = {
  consecutive: 0,
  sinceMs: null,
  sinceHlc: null,
  lastHlc: '',
}

/**
 * One reading against one threshold rule. Pure. `unresolved` says whether the sensor has an
 * alert of this rule that is not resolved yet.
 *
 * ```ts
 * const { condition, verdict } = evaluateThreshold(rule, condition, { value: 47, atMs, hlc }, false)
 * ```
 */
export function evaluateThreshold(
  rule: ThresholdRule,
  c: Condition,
  s: Sample,
  unresolved: boolean,
): { condition: Condition; verdict: Verdict } {
  // Seen already (redelivery, re-publish) or older than one already evaluated: never twice.
  if (s.hlc <= c.lastHlc) return { condition: c, verdict: 'none' }
  const breach = rule.direction === 'above' ? s.value >= rule.raiseAt : s.value <= rule.raiseAt
  const cleared = rule.direction === 'above' ? s.value <= rule.clearAt : s.value >= rule.clearAt
  const reset: Condition = { consecutive: 0, sinceMs: null, sinceHlc: null, lastHlc: s.hlc }
  if (unresolved) {
    if (cleared) return { condition: reset, verdict: 'resolve' }
    return { condition: { ...c, lastHlc: s.hlc }, verdict: breach ? 'again' : 'none' }
  }
  if (!breach) return { condition: reset, verdict: 'none' }
  const run: Condition = {
    consecutive: c.consecutive + 1,
    sinceMs: c.sinceMs ?? s.atMs,
    sinceHlc: c.sinceHlc ?? s.hlc,
    lastHlc: s.hlc,
  }
  const long =
    run.consecutive >= rule.consecutive &&
    s.atMs - (run.sinceMs ?? s.atMs) >= rule.forSeconds * 1000
  return { condition: run, verdict: long ? 'raise' : 'none' }
}

/** An alert as the fold sees it: the row of `alerts`. */
export type FoldedAlert = AlertTable

/** Where one rule stands for one sensor after some prefix of its inputs, in HLC order. */
export interface FoldState {
  readonly condition: Condition
  /** Its alert that is not resolved, if any. */
  readonly open: FoldedAlert | null
}

export const NEW_FOLD: FoldState = { condition: NEW_CONDITION, open: null }

/**
 * What one (rule, sensor) is folded from, each named by its event:
 * - `reading`: a value fed to a threshold rule, and whether the sensor was in maintenance or
 *   decommissioned at that point of its history (such a sensor raises nothing);
 * - `silenced` / `heard`: the sensor became unknown (a tick) / was heard from again (silent rules);
 * - `ack`: an operator acknowledged an alert of the sensor.
 */
export type FoldInput =
  | {
      readonly kind: 'reading'
      readonly eventId: string
      readonly hlc: string
      readonly correlationId: string
      readonly value: number
      readonly quiet: boolean
    }
  | {
      readonly kind: 'silenced'
      readonly eventId: string
      readonly hlc: string
      readonly correlationId: string
      readonly at: Date
    }
  | { readonly kind: 'heard'; readonly eventId: string; readonly hlc: string }
  | {
      readonly kind: 'ack'
      readonly eventId: string
      readonly hlc: string
      readonly alertId: string
      readonly by: string
    }

/** (hlc, event id) order: the order every fold takes its inputs in. */
export function byHlcThenId(
  a: { readonly hlc: string; readonly eventId: string },
  b: { readonly hlc: string; readonly eventId: string },
): number {
  if (a.hlc !== b.hlc) return a.hlc < b.hlc ? -1 : 1
  return a.eventId < b.eventId ? -1 : a.eventId > b.eventId ? 1 : 0
}

/** Deterministic: the same rule, sensor and raising event give the same id on every replay. */
export function alertId(ruleId: string, deviceId: string, raisingEventId: string): string {
  return `al-${createHash('sha256').update(`${ruleId}\u0000${deviceId}\u0000${raisingEventId}`).digest('hex').slice(0, 20)}`
}

/**
 * Folds one rule of one sensor over its inputs in HLC (then event id) order, from `start`: the
 * alerts it opens, resolves and acknowledges are a function of the set of inputs, whatever order
 * they arrived in. Pure. Returns every alert it touched (the start's open one included), in the
 * order raised, and the state after each input (for keeping only a window of inputs).
 *
 * ```ts
 * const { alerts, states } = foldRule(rule, 'sensor-1', NEW_FOLD, inputs.sort(byHlcThenId))
 * ```
 */
export function foldRule(
  rule: ThresholdRule | SilentRule,
  deviceId: string,
  start: FoldState,
  inputs: readonly FoldInput[],
): { alerts: FoldedAlert[]; states: FoldState[] } {
  // Most (rule, sensor) pairs of a batch have nothing new (a reading feeds one metric's rules).
  if (inputs.length === 0) return { alerts: start.open ? [start.open] : [], states: [] }
  // Made once an alert is open or resolved: most folds (a reading within its limits) have none.
  let alerts: Map<string, FoldedAlert> | undefined
  let condition = start.condition
  let open = start.open
  const states: FoldState[] = []
  const put = (a: FoldedAlert | null) => {
    if (a) (alerts ??= new Map()).set(a.alert_id, a)
  }
  put(open)
  for (const i of inputs) {
    switch (i.kind) {
      case 'reading': {
        if (rule.kind !== 'threshold') break
        const atMs = checkedHlcWallMs(i.hlc)
        const out = evaluateThreshold(rule, condition, { value: i.value, atMs, hlc: i.hlc }, !!open)
        condition = out.condition
        if (out.verdict === 'raise' && !i.quiet) {
          open = raised(rule, deviceId, i, hlcTime(i.hlc), i.value, thresholdMessage(rule, i.value))
        } else if (out.verdict === 'again' && open) {
          open = { ...open, occurrences: open.occurrences + 1, last_occurrence_event_id: i.eventId }
        } else if (out.verdict === 'resolve' && open) {
          put(resolved(open, i))
          open = null
        }
        break
      }
      case 'silenced':
        if (rule.kind === 'silent' && !open) {
          open = raised(rule, deviceId, i, i.at, null, SILENT_MESSAGE)
        }
        break
      case 'heard':
        if (rule.kind === 'silent' && open) {
          put(resolved(open, i))
          open = null
        }
        break
      case 'ack':
        // Only the alert open at the acknowledgement's place in the history; again changes nothing.
        if (open?.alert_id === i.alertId && open.state === 'open') {
          open = {
            ...open,
            state: 'acknowledged',
            acknowledged_at: hlcTime(i.hlc),
            acknowledged_hlc: i.hlc,
            acknowledged_by: i.by,
            acknowledged_event_id: i.eventId,
          }
        }
        break
    }
    put(open)
    states.push({ condition, open })
  }
  return { alerts: alerts === undefined ? [] : [...alerts.values()], states }
}

const SILENT_MESSAGE = 'no events within the inactivity timeout: status unknown'

function thresholdMessage(rule: ThresholdRule, value: number): string {
  return (
    `${rule.metric} ${value} ${rule.direction === 'above' ? '>=' : '<='} ${rule.raiseAt}` +
    (rule.consecutive > 1 ? ` for ${rule.consecutive} readings` : '') +
    (rule.forSeconds > 0 ? ` over ${rule.forSeconds} s` : '')
  )
}

function raised(
  rule: ThresholdRule | SilentRule,
  deviceId: string,
  by: { readonly eventId: string; readonly hlc: string; readonly correlationId: string },
  at: Date,
  value: number | null,
  message: string,
): FoldedAlert {
  return {
    alert_id: alertId(rule.id, deviceId, by.eventId),
    device_id: deviceId,
    rule_id: rule.id,
    severity: rule.severity,
    state: 'open',
    message,
    value,
    raised_at: at,
    raised_hlc: by.hlc,
    raised_event_id: by.eventId,
    correlation_id: by.correlationId,
    acknowledged_at: null,
    acknowledged_hlc: null,
    acknowledged_by: null,
    acknowledged_event_id: null,
    resolved_at: null,
    resolved_hlc: null,
    resolved_event_id: null,
    occurrences: 1,
    last_occurrence_event_id: by.eventId,
  }
}

function resolved(
  a: FoldedAlert,
  by: { readonly eventId: string; readonly hlc: string },
): FoldedAlert {
  return {
    ...a,
    state: 'resolved',
    resolved_at: hlcTime(by.hlc),
    resolved_hlc: by.hlc,
    resolved_event_id: by.eventId,
  }
}
