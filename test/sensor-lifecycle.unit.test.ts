import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import {
  effectiveStatus,
  NEW_SENSOR,
  observe,
  type SensorLifecycle,
} from '../projections/sensor-lifecycle.ts'
import type { DeviceEvent } from '../schemas/events.ts'
import { encodeHlc } from '../schemas/hlc.ts'

const T0 = 1_795_000_000_000
let n = 0
function event(
  kind: 'registered' | 'reading' | 'heartbeat' | 'status',
  wallMs: number,
  status?: string,
): DeviceEvent {
  const base = {
    eventId: `e-${++n}`,
    deviceId: 'sensor-1',
    version: 1 as const,
    occurredAt: new Date(wallMs).toISOString(),
    hlc: encodeHlc({ wallMs, logical: n % 7, node: 'gw' }),
    correlationId: `c-${n}`,
  }
  switch (kind) {
    case 'registered':
      return {
        ...base,
        type: 'sensor.registered',
        data: { site: 'site-1', model: 'm', firmware: `1.${n}`, inactivityTimeoutSeconds: 60 },
      }
    case 'reading':
      return { ...base, type: 'reading.recorded', data: { metric: 't', value: 1, unit: 'C' } }
    case 'heartbeat':
      return { ...base, type: 'heartbeat.received', data: {} }
    case 'status':
      return { ...base, type: 'status.changed', data: { status: status as 'active' } }
  }
}

const arbEvent = fc
  .record({
    kind: fc.constantFrom('registered', 'reading', 'heartbeat', 'status', 'status', 'status'),
    at: fc.integer({ min: 0, max: 600_000 }),
    status: fc.constantFrom('active', 'inactive', 'maintenance', 'decommissioned'),
  })
  .map((r) => event(r.kind, T0 + r.at, r.status))

const fold = (events: readonly DeviceEvent[]): SensorLifecycle => events.reduce(observe, NEW_SENSOR)

describe('sensor lifecycle', () => {
  it('ends in the same state for any order and any duplication of the same events', () => {
    fc.assert(
      fc.property(
        fc.array(arbEvent, { minLength: 1, maxLength: 40 }),
        fc.func(fc.integer()),
        fc.array(fc.nat(), { maxLength: 20 }),
        fc.integer({ min: 0, max: 900_000 }),
        (events, order, dupIdx, nowOffset) => {
          const inHlcOrder = [...events].sort((a, b) => (a.hlc < b.hlc ? -1 : 1))
          const dups = dupIdx.map((i) => events[i % events.length]!)
          const shuffled = [...events, ...dups]
            .map((e, i) => ({ e, k: order(i) }))
            .sort((a, b) => a.k - b.k)
            .map((x) => x.e)
          const a = fold(inHlcOrder)
          const b = fold(shuffled)
          expect(b).toEqual(a)
          expect(effectiveStatus(b, T0 + nowOffset, 300)).toBe(
            effectiveStatus(a, T0 + nowOffset, 300),
          )
        },
      ),
    )
  })

  it('is last-writer-wins by HLC: an older status never overwrites a newer one', () => {
    const reg = event('registered', T0)
    const newer = event('status', T0 + 2000, 'maintenance')
    const older = event('status', T0 + 1000, 'active')
    const s = fold([reg, newer, older])
    expect(effectiveStatus(s, null, 300)).toBe('maintenance')
  })

  it('breaks a tie between distinct events with one HLC by event id, in any order', () => {
    const reg = event('registered', T0)
    const a = {
      ...event('registered', T0 + 1000),
      eventId: 'e-a',
      hlc: encodeHlc({ wallMs: T0 + 1000, logical: 0, node: 'gw' }),
    }
    const b = { ...a, eventId: 'e-b', data: { ...a.data, firmware: '9.9' } } as DeviceEvent
    const m1 = { ...event('status', T0 + 2000, 'maintenance'), eventId: 'e-x' }
    const m2 = { ...m1, eventId: 'e-y', data: { status: 'inactive' } } as DeviceEvent
    const one = fold([reg, a, b, m1, m2])
    const other = fold([reg, m2, b, m1, a])
    expect(other).toEqual(one)
    expect(one.firmware).toBe('9.9')
    expect(one.lastSeenEventId).toBe('e-y')
    expect(effectiveStatus(one, null, 300)).toBe('inactive')
  })

  it('keeps a decommissioned sensor decommissioned until it is registered again', () => {
    const s = fold([
      event('registered', T0),
      event('status', T0 + 1000, 'decommissioned'),
      event('status', T0 + 2000, 'active'),
      event('reading', T0 + 3000),
    ])
    expect(effectiveStatus(s, T0 + 3000, 300)).toBe('decommissioned')
    expect(effectiveStatus(observe(s, event('registered', T0 + 4000)), T0 + 4000, 300)).toBe(
      'active',
    )
  })

  it('is unknown (never a guessed inactive) when silent past its timeout, by stream time', () => {
    const s = fold([event('registered', T0), event('heartbeat', T0 + 10_000)])
    // its own timeout (60 s) wins over the default
    expect(effectiveStatus(s, T0 + 70_000, 300)).toBe('active')
    expect(effectiveStatus(s, T0 + 70_001, 300)).toBe('unknown')
    expect(effectiveStatus(s, null, 300)).toBe('active') // no tick yet: nothing is silent
    // maintenance is not silence
    expect(
      effectiveStatus(observe(s, event('status', T0 + 20_000, 'maintenance')), T0 + 999_999, 300),
    ).toBe('maintenance')
  })
})
