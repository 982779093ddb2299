/**
 * The common case of `FleetEvent.safeParse`, checked without zod: a well-formed reading.
 *
 * Why: readings are nearly every event, and every processor and rebuild decodes each one. zod
 * costs ~2 us of CPU per reading here (a result object per field, every check through its
 * machinery) and much of the garbage collection of a rebuild; these checks are the same patterns
 * and literals, tested directly. This is no second schema: it accepts only what
 * {@link ReadingRecorded} accepts and returns what it returns (test/plain-reading.unit.test.ts
 * compares them on hostile input), and answers "not sure" for everything else, which zod then
 * decides and explains.
 */
import {
  DEVICE_ID_PATTERN,
  ID_PATTERN,
  ISO_DATETIME_PATTERN,
  POSTGRES_DATETIME,
} from './envelope.ts'
import { METRIC_PATTERN, UNIT_PATTERN, type ReadingRecorded } from './events.ts'
import { HLC_PATTERN } from './hlc.ts'

/**
 * `json` as {@link ReadingRecorded} parses it, when it is a reading that schema accepts with every
 * field of the plain kind; `undefined` when it is anything else (another type, a bad or unusual
 * field): then the schema decides.
 *
 * ```ts
 * const event = plainReading(json) ?? FleetEvent.safeParse(json) // same event either way
 * ```
 */
export function plainReading(json: unknown): ReadingRecorded | undefined {
  if (!isRecord(json) || json.type !== 'reading.recorded') return undefined
  let eventId: string | undefined
  let deviceId: string | undefined
  let occurredAt: string | undefined
  let hlc: string | undefined
  let correlationId: string | undefined
  let causationId: string | undefined
  let data: ReadingRecorded['data'] | undefined
  let typed = false
  let versioned = false
  // Every key, so that an unknown one (the schema is strict) is noticed; each key once at most.
  // for-in, not Object.keys: no array of keys per object (its prototype is Object.prototype).
  for (const key in json) {
    const v = json[key]
    switch (key) {
      case 'eventId':
        if (!matches(v, ID_PATTERN)) return undefined
        eventId = v
        break
      case 'deviceId':
        if (!matches(v, DEVICE_ID_PATTERN)) return undefined
        deviceId = v
        break
      case 'occurredAt':
        if (!matches(v, ISO_DATETIME_PATTERN) || !POSTGRES_DATETIME.test(v)) return undefined
        occurredAt = v
        break
      case 'hlc':
        if (!matches(v, HLC_PATTERN)) return undefined
        hlc = v
        break
      case 'correlationId':
        if (!matches(v, ID_PATTERN)) return undefined
        correlationId = v
        break
      case 'causationId':
        if (!matches(v, ID_PATTERN)) return undefined
        causationId = v
        break
      case 'type':
        typed = true // 'reading.recorded', as read above
        break
      case 'version':
        if (v !== 1) return undefined
        versioned = true
        break
      case 'data':
        data = plainData(v)
        if (data === undefined) return undefined
        break
      default:
        return undefined
    }
  }
  if (
    eventId === undefined ||
    deviceId === undefined ||
    occurredAt === undefined ||
    hlc === undefined ||
    correlationId === undefined ||
    data === undefined ||
    !typed ||
    !versioned
  ) {
    return undefined
  }
  // The schema's own key order (envelope, then type, version, data): the same object as zod's.
  return causationId === undefined
    ? {
        eventId,
        deviceId,
        occurredAt,
        hlc,
        correlationId,
        type: 'reading.recorded',
        version: 1,
        data,
      }
    : {
        eventId,
        deviceId,
        occurredAt,
        hlc,
        correlationId,
        causationId,
        type: 'reading.recorded',
        version: 1,
        data,
      }
}

function plainData(json: unknown): ReadingRecorded['data'] | undefined {
  if (!isRecord(json)) return undefined
  let metric: string | undefined
  let value: number | undefined
  let unit: string | undefined
  // for-in, not Object.keys: no array of keys per object (its prototype is Object.prototype).
  for (const key in json) {
    const v = json[key]
    switch (key) {
      case 'metric':
        if (!matches(v, METRIC_PATTERN)) return undefined
        metric = v
        break
      case 'value':
        // zod's number: finite only (JSON's 1e999 parses as Infinity).
        if (typeof v !== 'number' || !Number.isFinite(v)) return undefined
        value = v
        break
      case 'unit':
        if (!matches(v, UNIT_PATTERN)) return undefined
        unit = v
        break
      default:
        return undefined
    }
  }
  if (metric === undefined || value === undefined || unit === undefined) return undefined
  return { metric, value, unit }
}

/** A plain JSON object (JSON.parse makes no other kind). */
function isRecord(v: unknown): v is Record<string, unknown> {
  return (
    typeof v === 'object' &&
    v !== null &&
    !Array.isArray(v) &&
    Object.getPrototypeOf(v) === Object.prototype
  )
}

function matches(v: unknown, pattern: RegExp): v is string {
  return typeof v === 'string' && pattern.test(v)
}
