import { describe, expect, it } from 'vitest'
import { decodeEvent } from '../schemas/decode.ts'
import { FleetEvent } from '../schemas/events.ts'
import { plainReading } from '../schemas/plain-reading.ts'

const reading = {
  eventId: '0193a4f2-7c1e-7b55-9f1a-2b9c1e0d4a11',
  deviceId: 'sensor-7',
  occurredAt: '2026-11-23T10:00:00.000Z',
  hlc: '1795428000000-000000-gw-1',
  correlationId: '0193a4f2-7c1e-7b55-9f1a-2b9c1e0d4a11',
  type: 'reading.recorded',
  version: 1,
  data: { metric: 'temperature', value: 21.5, unit: 'C' },
}

/** Values a hostile or broken device might put in any field. */
const HOSTILE: unknown[] = [
  undefined,
  null,
  true,
  0,
  -0,
  1,
  1.5,
  -1e308,
  Infinity,
  Number.NaN,
  '',
  ' ',
  'x',
  'sensor-7',
  'Sensor 7',
  'a.b',
  'a\u0000b',
  'a\ud800b',
  '\u00e9',
  'x'.repeat(64),
  'x'.repeat(65),
  'x'.repeat(128),
  'x'.repeat(129),
  '1795428000000-000000-gw-1',
  '1795428000000-00000-gw-1',
  '2026-11-23T10:00:00Z',
  '2026-11-23T10:00:00.123456789+05:30',
  '2026-11-23T10:00:00+15:59',
  '2026-11-23T10:00:00+16:00',
  '2026-11-23T10:00:00-23:59',
  '2026-11-23T10:00:00',
  '2026-11-23 10:00:00Z',
  '2024-02-29T00:00:00Z',
  '2026-02-29T00:00:00Z',
  '2026-04-31T00:00:00Z',
  '0000-06-01T00:00:00Z',
  '0001-01-01T00:00:00Z',
  '9999-12-31T23:59:59.999Z',
  '2026-11-23T24:00:00Z',
  '2026-11-23T10:00:60Z',
  'temperature',
  'Temperature',
  '_t',
  't'.repeat(64),
  't'.repeat(65),
  'C',
  '°C',
  'm/s²',
  'a b',
  'a\tb',
  '\u200b',
  'x'.repeat(16),
  'x'.repeat(17),
  'reading.recorded',
  'heartbeat.received',
  [],
  ['x'],
  {},
  { metric: 'temperature', value: 1, unit: 'C' },
]

const KEYS = Object.keys(reading) as (keyof typeof reading)[]
const DATA_KEYS = ['metric', 'value', 'unit'] as const

/** `v` as a JSON literal (undefined has none: null). */
const lit = (v: unknown): string => JSON.stringify(v === undefined ? null : v)

/** Every variant of the reading: one field (of the envelope or data) set to a hostile value, removed, or an extra key. */
function* variants(): Generator {
  yield reading
  for (const k of [...KEYS, 'causationId', '__proto__', 'extra', 'Type']) {
    for (const v of HOSTILE) {
      yield JSON.parse(JSON.stringify({ ...reading, [k]: v }))
      yield JSON.parse(`{${JSON.stringify(k)}: ${lit(v)}, ${JSON.stringify(reading).slice(1)}`)
    }
    const { [k as keyof typeof reading]: _, ...without } = reading
    yield without
  }
  for (const k of [...DATA_KEYS, 'extra', '__proto__']) {
    for (const v of HOSTILE) {
      yield JSON.parse(JSON.stringify({ ...reading, data: { ...reading.data, [k]: v } }))
      yield JSON.parse(
        `{"data": {${JSON.stringify(k)}: ${lit(v)}, "metric": "m", "value": 1, "unit": "C"}, ${JSON.stringify(reading).slice(1)}`.replace(
          /,"data":\{[^}]*\}/,
          '',
        ),
      )
    }
    const { [k as keyof typeof reading.data]: _, ...without } = reading.data
    yield { ...reading, data: without }
  }
  // Keys in another order; a causation id.
  yield JSON.parse(JSON.stringify(Object.fromEntries(Object.entries(reading).reverse())))
  yield { ...reading, causationId: reading.eventId, data: { unit: 'C', value: -0, metric: 'x' } }
  for (const v of HOSTILE) yield v
}

describe('plain reading check', () => {
  it('accepts only what the schema accepts, and returns what it returns', () => {
    let plain = 0
    let count = 0
    for (const v of variants()) {
      count++
      const fast = plainReading(v)
      const zod = FleetEvent.safeParse(v)
      if (fast !== undefined) {
        plain++
        expect(zod.success, JSON.stringify(v)).toBe(true)
        expect(JSON.stringify(fast)).toBe(JSON.stringify(zod.data))
        expect(fast).toStrictEqual(zod.data)
      }
      if (zod.success && zod.data.type === 'reading.recorded') {
        // Every valid reading built here is of the plain kind: the fast path is the one taken.
        expect(fast, JSON.stringify(v)).toBeDefined()
      }
    }
    expect(count).toBeGreaterThan(1000)
    expect(plain).toBeGreaterThan(100)
  })

  it('leaves every refusal to the schema: the same reason and detail as before', () => {
    const d = decodeEvent({
      subject: 'fleet.events.sensor-7.reading',
      data: new TextEncoder().encode(
        JSON.stringify({ ...reading, data: { ...reading.data, unit: 'a b', extra: 1 } }),
      ),
    })
    expect(d.ok).toBe(false)
    if (d.ok) return
    expect(d.reason).toBe('invalid-event')
    expect(d.detail).toContain("'data.unit' must match")
    expect(d.detail).toContain("got 'a b'")
    expect(d.detail).toContain('extra')
  })
})
