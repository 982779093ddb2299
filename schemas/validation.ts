import { BadInputError } from './errors.ts'
import type { z } from 'zod'

/**
 * Bad input: one line per problem, each naming the field, the rule and the value.
 *
 * ```txt
 * 'deviceId' must match /^[a-z0-9-]{1,64}$/, got 'Sensor 7'
 * ```
 */
export class ValidationError extends BadInputError {
  constructor(
    readonly problems: readonly string[],
    what = 'input',
    options?: ErrorOptions,
  ) {
    super(invalidMessage(problems, what), options)
  }
}

/** `invalid <what>: <problem>; <problem>`: the one line that lists every problem at once. */
export function invalidMessage(problems: readonly string[], what: string): string {
  return `invalid ${what}: ${problems.join('; ')}`
}

/** Parse or throw a {@link ValidationError} listing every problem at once. */
export function parseOrThrow<S extends z.ZodType>(
  schema: S,
  value: unknown,
  what: string,
): z.output<S> {
  const result = schema.safeParse(value)
  if (!result.success) throw new ValidationError(describeIssues(issuesOf(schema, value)), what)
  return result.data
}

/**
 * The issues of a value a schema refused, each with the input it refused (for "got ..."). Parsed
 * a second time on this rare path: `reportInput` makes every successful parse a third slower.
 */
export function issuesOf(schema: z.ZodType, value: unknown): z.core.$ZodIssue[] {
  const again = schema.safeParse(value, { reportInput: true })
  return again.success ? [] : again.error.issues
}

/** Turns zod issues into "'field' rule, got value" lines. */
export function describeIssues(issues: readonly z.core.$ZodIssue[]): string[] {
  return issues.flatMap(describeIssue)
}

function describeIssue(issue: z.core.$ZodIssue): string[] {
  const field = formatPath(issue.path)
  const got = `got ${formatValue(issue.input)}`
  // A missing field reads the same whatever rule it would have broken.
  if (issue.input === undefined && issue.code !== 'unrecognized_keys' && issue.code !== 'custom') {
    const what =
      issue.code === 'invalid_type'
        ? issue.expected === 'int'
          ? 'an integer'
          : issue.expected
        : issue.code === 'invalid_value'
          ? oneOf(issue.values)
          : undefined
    return [`'${field}' is required${what ? ` (${what})` : ''}`]
  }
  switch (issue.code) {
    case 'invalid_type':
      if (issue.expected === 'number' && typeof issue.input === 'number') {
        return [`'${field}' must be a finite number, ${got}`]
      }
      return [
        `'${field}' must be ${issue.expected === 'int' ? 'an integer' : article(issue.expected)}, ${got}`,
      ]
    case 'invalid_format':
      if (issue.format === 'regex' && issue.pattern)
        return [`'${field}' must match ${issue.pattern}, ${got}`]
      return [`'${field}' must be ${formatName(issue.format)}, ${got}`]
    case 'too_big':
      return [
        `'${field}' must be ${bound('at most', issue.maximum, issue.origin, issue.inclusive)}, ${got}`,
      ]
    case 'too_small':
      return [
        `'${field}' must be ${bound('at least', issue.minimum, issue.origin, issue.inclusive)}, ${got}`,
      ]
    case 'invalid_value':
      return [`'${field}' must be ${oneOf(issue.values)}, ${got}`]
    case 'unrecognized_keys': {
      // Present only when parsed with { reportInput: true }.
      const input: Record<string, unknown> | undefined = issue.input
      return issue.keys.map((key) => {
        const path = field === '(root)' ? key : `${field}.${key}`
        return `'${path}' is not a known field, got ${formatValue(input?.[key])}`
      })
    }
    case 'invalid_union':
      if ('discriminator' in issue && typeof issue.discriminator === 'string') {
        const input = (issue.input ?? {}) as Record<string, unknown>
        const options = (issue as { options?: unknown[] }).options ?? []
        return [
          `'${field}' must be ${oneOf(options)}, got ${formatValue(input[issue.discriminator])}`,
        ]
      }
      return [`'${field}' ${issue.message}, ${got}`]
    case 'not_multiple_of':
      return [`'${field}' must be a multiple of ${String(issue.divisor)}, ${got}`]
    default:
      return [`'${field}' ${issue.message}, ${got}`]
  }
}

function formatPath(path: readonly PropertyKey[]): string {
  if (path.length === 0) return '(root)'
  return path
    .map((p, i) => (typeof p === 'number' ? `[${p}]` : i === 0 ? String(p) : `.${String(p)}`))
    .join('')
}

/** Renders a value for an error message: quoted, bounded, and honest about NaN and Infinity. */
export function formatValue(value: unknown): string {
  if (typeof value === 'string') return `'${escapeInvisible(truncate(value, 80))}'`
  if (typeof value === 'number' || typeof value === 'bigint' || typeof value === 'boolean') {
    return String(value)
  }
  if (value === undefined) return 'nothing'
  try {
    return truncate(JSON.stringify(value), 80)
  } catch {
    return Object.prototype.toString.call(value)
  }
}

/** Control characters and lone surrogates as `\\uXXXX`: a message must be safe to log and to send. */
function escapeInvisible(s: string): string {
  return s.replace(
    /[\p{Cc}\p{Cs}]/gu,
    (c) => `\\u${(c.codePointAt(0) ?? 0).toString(16).padStart(4, '0')}`,
  )
}

function truncate(s: string, max: number): string {
  return s.length > max ? `${s.slice(0, max)}…(${s.length} chars)` : s
}

function article(type: string): string {
  return /^[aeiou]/.test(type) ? `an ${type}` : `a ${type}`
}

function formatName(format: string): string {
  return format === 'datetime'
    ? 'an ISO 8601 date-time with a zone (e.g. 2026-11-23T10:00:00Z)'
    : `a valid ${format}`
}

function bound(
  word: string,
  limit: unknown,
  origin: string,
  inclusive: boolean | undefined,
): string {
  const n = String(limit)
  switch (origin) {
    case 'string':
      return `${word} ${n} characters long`
    case 'array':
    case 'set':
      return `${word} ${n} items`
    default:
      return inclusive === false ? `${word === 'at most' ? '<' : '>'} ${n}` : `${word} ${n}`
  }
}

function oneOf(values: readonly unknown[]): string {
  const list = values.map(formatValue)
  return list.length === 1 ? (list[0] ?? '') : `one of ${list.join(', ')}`
}
