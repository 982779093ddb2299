import * as z from 'zod'
import { MetricName } from '../schemas/events.ts'
import { parseOrThrow } from '../schemas/validation.ts'

export const Severity = z.enum(['info', 'warning', 'critical'])
export type Severity = z.infer<typeof Severity>

/** A threshold on one metric with hysteresis; battery-low is a threshold on battery percent. */
export interface ThresholdRule {
  readonly kind: 'threshold'
  readonly id: string
  readonly severity: Severity
  /** Reading metric it watches ('battery' for battery-low). */
  readonly metric: string
  /** Heartbeats' batteryPercent also feeds this rule (battery-low rules only). */
  readonly includeHeartbeatBattery: boolean
  readonly direction: 'above' | 'below'
  /** Raise when value >= raiseAt (above) or <= raiseAt (below)... */
  readonly raiseAt: number
  /** ...and resolve when value <= clearAt (above) or >= clearAt (below): hysteresis. */
  readonly clearAt: number
  /** Breaching readings in a row needed to raise (>= 1). */
  readonly consecutive: number
  /** The breach must also have lasted this long, by event time (0: no minimum). */
  readonly forSeconds: number
}

/** Raised when a sensor's status becomes unknown (silent past its inactivity timeout). */
export interface SilentRule {
  readonly kind: 'silent'
  readonly id: string
  readonly severity: Severity
}

export type AlertRule = ThresholdRule | SilentRule

export interface AlertRules {
  readonly rules: readonly AlertRule[]
}

/*
 * The cross-field checks below also run on objects with other problems (`when`), so that one
 * error lists every problem in the file. They therefore read a field only if it passed its own
 * checks, and nothing here may abort the parse: zod's `.int()` does (it would silence them), so
 * integers are checked with a refinement.
 */
const evenWithOtherProblems = { when: (payload: { value: unknown }) => isRecord(payload.value) }

const RuleId = z.string().regex(/^[a-z0-9-]{1,64}$/)
const integer = (min: number, max: number) =>
  z
    .number()
    .min(min)
    .max(max)
    .refine((n) => Number.isInteger(n), 'must be an integer')
const Consecutive = integer(1, 1000).default(1)
const ForSeconds = integer(0, 86_400).default(0)
const Percent = z.number().min(0).max(100)

const Threshold = z
  .strictObject({
    id: RuleId,
    kind: z.literal('threshold'),
    metric: MetricName,
    above: z.number().optional(),
    below: z.number().optional(),
    clear: z.number(),
    consecutive: Consecutive,
    forSeconds: ForSeconds,
    severity: Severity,
  })
  .superRefine((rule, ctx) => {
    if (rule.above === undefined && rule.below === undefined) {
      ctx.addIssue({
        code: 'custom',
        path: ['above'],
        message: "is required unless 'below' is given",
        input: undefined,
      })
    } else if (rule.above !== undefined && rule.below !== undefined) {
      ctx.addIssue({
        code: 'custom',
        path: ['below'],
        message: "must be absent when 'above' is given",
        input: rule.below,
      })
    } else {
      checkClearSide(ctx, rule.above !== undefined ? 'above' : 'below')
    }
  }, evenWithOtherProblems)

const BatteryLow = z
  .strictObject({
    id: RuleId,
    kind: z.literal('battery-low'),
    below: Percent,
    clear: Percent,
    consecutive: Consecutive,
    forSeconds: ForSeconds,
    severity: Severity,
  })
  .superRefine((_rule, ctx) => {
    checkClearSide(ctx, 'below')
  }, evenWithOtherProblems)

const Silent = z.strictObject({ id: RuleId, kind: z.literal('silent'), severity: Severity })

const RuleEntry = z.discriminatedUnion('kind', [Threshold, BatteryLow, Silent])
type RuleEntry = z.infer<typeof RuleEntry>

/**
 * The file's schema (what operators write). Parse it with {@link parseAlertRules}, which also
 * normalizes the rules.
 *
 * ```yaml
 * rules:
 *   - id: temperature-high   # /^[a-z0-9-]{1,64}$/, unique across the file
 *     kind: threshold
 *     metric: temperature
 *     above: 40              # exactly one of above / below
 *     clear: 35              # < above (> below): hysteresis
 *     consecutive: 3         # optional, 1..1000, default 1
 *     forSeconds: 60         # optional, 0..86400, default 0
 *     severity: critical     # info | warning | critical
 *   - { id: battery-low, kind: battery-low, below: 15, clear: 20, severity: warning }
 *   - { id: sensor-silent, kind: silent, severity: warning }
 * ```
 */
export const AlertRulesFile = z
  .strictObject({ rules: z.array(RuleEntry) })
  .superRefine((file, ctx) => {
    const rules: unknown = file.rules
    if (!Array.isArray(rules)) return
    const failed = new Set(ctx.issues.filter((i) => i.path?.[2] === 'id').map((i) => i.path?.[1]))
    const firstUse = new Map<string, number>()
    rules.forEach((rule: unknown, i) => {
      const id = isRecord(rule) && !failed.has(i) ? rule.id : undefined
      if (typeof id !== 'string') return
      const first = firstUse.get(id)
      if (first === undefined) firstUse.set(id, i)
      else
        ctx.addIssue({
          code: 'custom',
          path: ['rules', i, 'id'],
          message: `must be unique (already used by rules[${first}])`,
          input: id,
        })
    })
  }, evenWithOtherProblems)
export type AlertRulesFile = z.infer<typeof AlertRulesFile>

/**
 * Validates parsed YAML/JSON data and normalizes it (battery-low becomes a threshold on battery
 * percent, defaults filled in) into a deeply frozen object.
 *
 * @throws {ValidationError} listing every problem in the file at once.
 *
 * ```ts
 * parseAlertRules({
 *   rules: [{ id: 'battery-low', kind: 'battery-low', below: 15, clear: 20, severity: 'warning' }],
 * })
 * // { rules: [{ kind: 'threshold', metric: 'battery', direction: 'below', raiseAt: 15, ... }] }
 * ```
 */
export function parseAlertRules(data: unknown): AlertRules {
  const file = parseOrThrow(AlertRulesFile, data, 'alert rules')
  return deepFreeze({ rules: file.rules.map(normalize) })
}

function normalize(rule: RuleEntry): AlertRule {
  switch (rule.kind) {
    case 'silent':
      return { kind: 'silent', id: rule.id, severity: rule.severity }
    case 'battery-low':
      return {
        kind: 'threshold',
        id: rule.id,
        severity: rule.severity,
        metric: 'battery',
        includeHeartbeatBattery: true,
        direction: 'below',
        raiseAt: rule.below,
        clearAt: rule.clear,
        consecutive: rule.consecutive,
        forSeconds: rule.forSeconds,
      }
    case 'threshold': {
      const [direction, raiseAt] =
        rule.above !== undefined
          ? (['above', rule.above] as const)
          : (['below', rule.below] as const)
      // The schema guarantees exactly one of above / below.
      if (raiseAt === undefined) throw new Error(`rule '${rule.id}' has neither above nor below`)
      return {
        kind: 'threshold',
        id: rule.id,
        severity: rule.severity,
        metric: rule.metric,
        includeHeartbeatBattery: false,
        direction,
        raiseAt,
        clearAt: rule.clear,
        consecutive: rule.consecutive,
        forSeconds: rule.forSeconds,
      }
    }
  }
}

/** `clear` must sit on the quiet side of the raise level, or the alert could never resolve. */
function checkClearSide(ctx: z.core.$RefinementCtx<object>, side: 'above' | 'below'): void {
  const level = passedNumber(ctx, side)
  const clear = passedNumber(ctx, 'clear')
  if (level === undefined || clear === undefined) return
  if (side === 'above' ? clear < level : clear > level) return
  ctx.addIssue({
    code: 'custom',
    path: ['clear'],
    message: `must be ${side === 'above' ? 'below' : 'above'} '${side}' (${level})`,
    input: clear,
  })
}

/** A field's value if it is a number that passed its own checks, else undefined. */
function passedNumber(ctx: z.core.$RefinementCtx<object>, key: string): number | undefined {
  if (ctx.issues.some((i) => i.path?.[0] === key)) return undefined
  const value: unknown = (ctx.value as Record<string, unknown>)[key]
  return typeof value === 'number' && Number.isFinite(value) ? value : undefined
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null
}

function deepFreeze<T extends object>(o: T): T {
  for (const v of Object.values(o)) if (typeof v === 'object' && v !== null) deepFreeze(v as object)
  return Object.freeze(o)
}
