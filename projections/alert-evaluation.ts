import type { ThresholdRule } from './alert-rules.ts'

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
