/**
 * How the commands read their options and arguments, in one place: the number parsers, the
 * processor names, `--timeout`, `--device` and `--since`. Each refuses a value with a message that
 * names the rule and the value; commander prefixes the option (`option '--limit <n>' argument
 * '1.5' is invalid. must be an integer >= 1, got '1.5'`) and the CLI exits 2.
 */
import { InvalidArgumentError, Option } from 'commander'
import { OperatorError } from '../schemas/errors.ts'
import { PROCESSOR_NAMES, type ProcessorName } from '../processors/processor-registry.ts'
import type { ReplayFrom } from '../processors/admin/replay.ts'
import { DEVICE_ID_PATTERN, SYSTEM_SOURCE } from '../schemas/envelope.ts'

/**
 * Bad usage that a command's action finds itself (two options that exclude each other, an
 * unknown processor among several): exit 2, with where to read more.
 */
export class UsageError extends OperatorError {}

/** A commander parser for a number `ok` accepts; anything else is "must be <rule>, got '<v>'". */
function numberParser(rule: string, ok: (n: number) => boolean): (v: string) => number {
  return (v) => {
    const n = Number(v)
    if (v.trim() === '' || !ok(n)) throw new InvalidArgumentError(`must be ${rule}, got '${v}'`)
    return n
  }
}

export const positiveInteger = numberParser(
  'an integer >= 1',
  (n) => Number.isSafeInteger(n) && n >= 1,
)
export const nonNegativeInteger = numberParser(
  'an integer >= 0',
  (n) => Number.isSafeInteger(n) && n >= 0,
)
export const positive = numberParser('a number > 0', (n) => Number.isFinite(n) && n > 0)
export const nonNegative = numberParser('a number >= 0', (n) => Number.isFinite(n) && n >= 0)
export const ratio = numberParser(
  'a number in [0, 1]',
  (n) => Number.isFinite(n) && n >= 0 && n <= 1,
)

const isProcessorName = (v: string): v is ProcessorName =>
  (PROCESSOR_NAMES as readonly string[]).includes(v)

const mustBeProcessor = (v: string) => `must be one of ${PROCESSOR_NAMES.join(', ')}, got '${v}'`

/** The `<projection>` argument of `rebuild` and `replay`. */
export function processorName(v: string): ProcessorName {
  if (!isProcessorName(v)) throw new InvalidArgumentError(mustBeProcessor(v))
  return v
}

/** The `[processor...]` arguments of `run` and `status`: all of them when none is named. */
export function selectProcessors(names: string[]): ProcessorName[] {
  if (names.length === 0) return [...PROCESSOR_NAMES]
  return names.map((n) => {
    if (!isProcessorName(n)) throw new UsageError(`'processor' ${mustBeProcessor(n)}`)
    return n
  })
}

/** `--timeout` of a one-shot command. */
export function timeoutOption(what = 'NATS and PostgreSQL'): Option {
  return new Option('--timeout <seconds>', `give up waiting for ${what} after this long`)
    .argParser(positive)
    .default(10)
}

/** `--device`: a device id, or `_system` for clock ticks. */
export function parseDeviceOption(v: string): string {
  if (DEVICE_ID_PATTERN.test(v) || v === SYSTEM_SOURCE) return v
  throw new InvalidArgumentError(
    `must match ${DEVICE_ID_PATTERN} (or be '${SYSTEM_SOURCE}'), got '${v}'`,
  )
}

const DURATION = /^(\d+)(ms|s|m|h|d)$/
const UNIT_MS = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 } as const
const ISO_WITH_ZONE = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})$/

/** `--since`: an ISO 8601 time with a zone, or how long ago (`90s`, `15m`, `2h`, `1d`). */
export function parseSinceOption(v: string, nowMs = Date.now()): Date {
  const d = DURATION.exec(v)
  if (d !== null) return new Date(nowMs - Number(d[1]) * UNIT_MS[d[2] as keyof typeof UNIT_MS])
  const t = ISO_WITH_ZONE.test(v) ? Date.parse(v) : Number.NaN
  if (Number.isFinite(t)) return new Date(t)
  throw new InvalidArgumentError(
    `must be an ISO 8601 time with a zone (e.g. 2026-11-23T10:00:00Z) or a duration ago (e.g. 90s, 15m, 2h, 1d), got '${v}'`,
  )
}

/** `replay --since`, parsed as `events tail` parses it, keeping what the operator typed for messages. */
export function parseReplaySince(text: string, now = Date.now()): ReplayFrom {
  return { since: parseSinceOption(text, now), text }
}
