import { describe, expect, it } from 'vitest'
import {
  evaluateThreshold,
  NEW_CONDITION,
  type Condition,
  type Verdict,
} from '../projections/alert-evaluation.ts'
import type { ThresholdRule } from '../projections/alert-rules.ts'
import { encodeHlc } from '../schemas/hlc.ts'

const rule: ThresholdRule = {
  kind: 'threshold',
  id: 'temperature-high',
  severity: 'critical',
  metric: 'temperature',
  includeHeartbeatBattery: false,
  direction: 'above',
  raiseAt: 40,
  clearAt: 35,
  consecutive: 3,
  forSeconds: 0,
}

/** Feeds values one second apart and returns the verdicts, tracking whether an alert is open. */
function run(
  r: ThresholdRule,
  values: number[],
  start = NEW_CONDITION,
): { verdicts: Verdict[]; condition: Condition } {
  let c = start
  let open = false
  const verdicts: Verdict[] = []
  values.forEach((value, i) => {
    const atMs = 1_795_000_000_000 + i * 1000
    const out = evaluateThreshold(
      r,
      c,
      { value, atMs, hlc: encodeHlc({ wallMs: atMs, logical: 0, node: 'gw' }) },
      open,
    )
    c = out.condition
    verdicts.push(out.verdict)
    if (out.verdict === 'raise') open = true
    if (out.verdict === 'resolve') open = false
  })
  return { verdicts, condition: c }
}

describe('threshold evaluation', () => {
  it('raises after the required run of breaching readings, and a broken run starts over', () => {
    expect(run(rule, [41, 42, 30, 41, 41, 41]).verdicts).toEqual([
      'none',
      'none',
      'none',
      'none',
      'none',
      'raise',
    ])
  })

  it('resolves only below the clear level (hysteresis) and counts further breaches', () => {
    expect(run(rule, [41, 41, 41, 38, 45, 36, 35, 41]).verdicts).toEqual([
      'none',
      'none',
      'raise',
      'none',
      'again',
      'none',
      'resolve',
      'none',
    ])
  })

  it('needs the breach to last forSeconds by event time as well', () => {
    const timed = { ...rule, consecutive: 1, forSeconds: 3 }
    expect(run(timed, [41, 41, 41, 41]).verdicts).toEqual(['none', 'none', 'none', 'raise'])
  })

  it('works downwards (below / clear above)', () => {
    const low = { ...rule, direction: 'below' as const, raiseAt: 15, clearAt: 20, consecutive: 1 }
    expect(run(low, [30, 15, 18, 20]).verdicts).toEqual(['none', 'raise', 'none', 'resolve'])
  })

  it('never evaluates a reading twice, nor one older than the newest evaluated', () => {
    const { condition } = run(rule, [41, 41])
    const sample = { value: 41, atMs: 1_795_000_000_000 + 1000, hlc: condition.lastHlc }
    expect(evaluateThreshold(rule, condition, sample, false)).toEqual({
      condition,
      verdict: 'none',
    })
    const older = {
      ...sample,
      hlc: encodeHlc({ wallMs: 1_795_000_000_000, logical: 0, node: 'gw' }),
    }
    expect(evaluateThreshold(rule, condition, older, false).condition.consecutive).toBe(2)
  })
})
