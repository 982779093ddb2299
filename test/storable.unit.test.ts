import { describe, expect, it } from 'vitest'
import { decodeEvent } from '../schemas/decode.ts'
import { FleetEvent } from '../schemas/events.ts'
import { eventSubject } from '../schemas/subjects.ts'

/**
 * "A value the schema accepts must be a value Postgres stores": what Postgres refuses (or stores
 * altered) is refused at decode, naming the field, the rule and the value. Each refusal here is
 * tried against real Postgres in test/postgres-refusals.int.test.ts.
 */
const envelope = {
  eventId: 'e-1',
  deviceId: 'sensor-7',
  version: 1,
  occurredAt: '2026-11-23T10:00:00.000Z',
  hlc: '1795428000000-000000-gw-1',
  correlationId: 'e-1',
  causationId: 'e-0',
}
/** One event of every type, every optional string field filled. */
export const everyKind: Record<string, unknown>[] = [
  {
    ...envelope,
    type: 'reading.recorded',
    data: { metric: 'temperature', value: 21.5, unit: 'C' },
  },
  {
    ...envelope,
    type: 'sensor.registered',
    data: { site: 'site-1', model: 'th-200', firmware: '1.4.2', inactivityTimeoutSeconds: 60 },
  },
  {
    ...envelope,
    type: 'heartbeat.received',
    data: { batteryPercent: 88, rssiDbm: -61, uptimeSeconds: 5 },
  },
  { ...envelope, type: 'status.changed', data: { status: 'maintenance', reason: 'calibration' } },
  {
    ...envelope,
    type: 'alert.acknowledged',
    data: { alertId: 'a-1', by: 'ops', note: 'on it' },
  },
  {
    ...envelope,
    deviceId: '_system',
    type: 'clock.ticked',
    data: { at: '2026-11-23T10:00:00.000Z', intervalSeconds: 10 },
  },
]

const decodeAs = (e: Record<string, unknown>) =>
  decodeEvent({
    subject: eventSubject(e.deviceId as string, e.type as FleetEvent['type']),
    data: new TextEncoder().encode(JSON.stringify(e)),
  })
const refusal = (e: Record<string, unknown>) => {
  const d = decodeAs(e)
  if (d.ok) throw new Error(`expected a refusal of ${JSON.stringify(e)}`)
  return d
}

/** Every string leaf of an event, as a path and a setter on a deep copy. */
function stringLeaves(
  e: Record<string, unknown>,
): { path: string; set: (v: string) => Record<string, unknown> }[] {
  const out: { path: string; set: (v: string) => Record<string, unknown> }[] = []
  const walk = (o: Record<string, unknown>, path: string[]) => {
    for (const [k, v] of Object.entries(o)) {
      if (typeof v === 'string') {
        out.push({
          path: [...path, k].join('.'),
          set: (s) => {
            const copy = structuredClone(e)
            let at = copy
            for (const p of path) at = at[p] as Record<string, unknown>
            at[k] = s
            return copy
          },
        })
      } else if (typeof v === 'object' && v !== null)
        walk(v as Record<string, unknown>, [...path, k])
    }
  }
  walk(e, [])
  return out
}

describe('the schema refuses what Postgres cannot store', () => {
  it('accepts the samples', () => {
    for (const e of everyKind) expect(decodeAs(e)).toMatchObject({ ok: true })
  })

  it('refuses U+0000 and lone surrogates in every string field of every event, naming the field', () => {
    let tried = 0
    for (const bad of ['\u0000', '\ud800', '\udfff']) {
      for (const e of everyKind) {
        for (const leaf of stringLeaves(e)) {
          if (leaf.path === 'type' || leaf.path === 'deviceId') continue // they pick the schema and subject
          const original = leaf.path
            .split('.')
            .reduce<unknown>((o, p) => (o as Record<string, unknown>)[p], e) as string
          const d = refusal(leaf.set(`${original.slice(0, 1)}${bad}${original.slice(1)}`))
          expect(d.reason, leaf.path).toBe('invalid-event')
          expect(d.detail, leaf.path).toContain(`'${leaf.path}'`)
          expect(d.detail, `${leaf.path}: the value is shown escaped`).not.toContain(bad)
          tried++
        }
      }
    }
    expect(tried).toBeGreaterThanOrEqual(60)
  })

  it('says what is wrong with a NUL in free text, and shows the value escaped', () => {
    const d = refusal({ ...everyKind[3], data: { status: 'maintenance', reason: 'bad\u0000byte' } })
    expect(d.detail).toBe(
      "'data.reason' must not contain U+0000 (Postgres text cannot hold it), got 'bad\\u0000byte'",
    )
  })

  it('refuses lone surrogates (Postgres would store U+FFFD in their place, or refuse them in jsonb)', () => {
    for (const [path, value] of [
      ['reason', 'half \ud83d of an emoji'],
      ['reason', 'trailing \udc00'],
    ] as const) {
      const d = refusal({ ...everyKind[3], data: { status: 'maintenance', [path]: value } })
      expect(d.detail).toContain(`'data.${path}' must be well-formed Unicode (no lone surrogate`)
      expect(d.detail).toMatch(/\\ud83d|\\udc00/)
    }
    const note = refusal({ ...everyKind[4], data: { alertId: 'a-1', by: 'ops', note: '\udfff' } })
    expect(note.detail).toContain("'data.note' must be well-formed Unicode")
    // A whole surrogate pair is a character like any other.
    expect(decodeAs({ ...everyKind[3], data: { status: 'maintenance', reason: 'ok 😀' } }).ok).toBe(
      true,
    )
  })

  it('refuses date-times outside what Postgres timestamptz reads: year 0000, offsets beyond ±15:59', () => {
    const at = (occurredAt: string) => refusal({ ...everyKind[0], occurredAt }).detail
    expect(at('0000-06-01T00:00:00.000Z')).toBe(
      "'occurredAt' must be a date-time Postgres can store (year 0001 to 9999, UTC offset within ±15:59), got '0000-06-01T00:00:00.000Z'",
    )
    expect(at('0000-02-29T00:00:00Z')).toContain(
      "'occurredAt' must be a date-time Postgres can store",
    )
    expect(at('2026-01-01T00:00:00+16:00')).toContain(
      "'occurredAt' must be a date-time Postgres can store",
    )
    expect(at('2026-01-01T00:00:00-23:59')).toContain("got '2026-01-01T00:00:00-23:59'")
    // Years past 9999 (Postgres stops at 294276, JS Date at 275760) never match the format.
    expect(at('+294277-01-01T00:00:00Z')).toContain("'occurredAt' must be an ISO 8601 date-time")
    const tick = refusal({
      ...everyKind[5],
      data: { at: '0000-01-01T00:00:00Z', intervalSeconds: 10 },
    })
    expect(tick.detail).toContain("'data.at' must be a date-time Postgres can store")
  })

  it('accepts the edges Postgres stores', () => {
    for (const occurredAt of [
      '0001-01-01T00:00:00Z',
      '0001-01-01T00:00:00+15:59',
      '9999-12-31T23:59:59.999999-15:59',
      '2026-01-01T00:00:00.123456789Z',
    ])
      expect(decodeAs({ ...everyKind[0], occurredAt }), occurredAt).toMatchObject({ ok: true })
  })
})
