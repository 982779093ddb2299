import { describe, expect, it } from 'vitest'
import { decodeEvent } from '../schemas/decode.ts'
import { FleetEvent } from '../schemas/events.ts'
import { eventSubject, parseEventSubject } from '../schemas/subjects.ts'
import { parseOrThrow, ValidationError } from '../schemas/validation.ts'

const reading = {
  eventId: '0193a4f2-7c1e-7b55-9f1a-2b9c1e0d4a11',
  deviceId: 'sensor-7',
  type: 'reading.recorded',
  version: 1,
  occurredAt: '2026-11-23T10:00:00.000Z',
  hlc: '1795428000000-000000-gw-1',
  correlationId: '0193a4f2-7c1e-7b55-9f1a-2b9c1e0d4a11',
  data: { metric: 'temperature', value: 21.5, unit: 'C' },
}
const bytes = (v: unknown) =>
  new TextEncoder().encode(typeof v === 'string' ? v : JSON.stringify(v))
const decode = (v: unknown, subject = 'fleet.events.sensor-7.reading', msgId?: string) =>
  decodeEvent({ subject, data: bytes(v), msgId })
const detail = (v: unknown, subject?: string) => {
  const d = decode(v, subject)
  if (d.ok) throw new Error('expected a refusal')
  return d
}

describe('event contract', () => {
  it('accepts every kind and routes it to its subject', () => {
    const events = [
      reading,
      {
        ...reading,
        type: 'sensor.registered',
        data: { site: 'site-1', model: 'th-200', firmware: '1.4.2' },
      },
      { ...reading, type: 'heartbeat.received', data: { batteryPercent: 88, rssiDbm: -61 } },
      {
        ...reading,
        type: 'status.changed',
        data: { status: 'maintenance', reason: 'calibration' },
      },
    ]
    expect(
      events.map((e) => eventSubject(e.deviceId, parseOrThrow(FleetEvent, e, 'event').type)),
    ).toEqual([
      'fleet.events.sensor-7.reading',
      'fleet.events.sensor-7.registered',
      'fleet.events.sensor-7.heartbeat',
      'fleet.events.sensor-7.status',
    ])
    for (const e of events)
      expect(decode(e, eventSubject('sensor-7', e.type as FleetEvent['type'])).ok).toBe(true)
  })

  it('names field, rule and value for a bad deviceId', () => {
    expect(detail({ ...reading, deviceId: 'Sensor 7' }).detail).toContain(
      "'deviceId' must match /^[a-z0-9-]{1,64}$/, got 'Sensor 7'",
    )
  })

  it('refuses non-finite numbers (JSON 1e999 parses as Infinity)', () => {
    const d = detail(
      '{"eventId":"e1","deviceId":"sensor-7","type":"reading.recorded","version":1,"occurredAt":"2026-11-23T10:00:00Z","hlc":"1795428000000-000000-gw-1","correlationId":"e1","data":{"metric":"t","value":1e999,"unit":"C"}}',
    )
    expect(d.reason).toBe('invalid-event')
    expect(d.detail).toBe("'data.value' must be a finite number, got Infinity")
  })

  it('refuses unknown types and unknown fields, naming them', () => {
    expect(detail({ ...reading, type: 'reading.deleted' }).detail).toMatch(
      /^'type' must be one of 'sensor.registered', 'reading.recorded', 'heartbeat.received', 'status.changed', 'alert.acknowledged', 'clock.ticked', got 'reading.deleted'$/,
    )
    expect(detail({ ...reading, extra: 1 }).detail).toBe("'extra' is not a known field, got 1")
    expect(detail({ ...reading, data: { ...reading.data, colour: 'red' } }).detail).toBe(
      "'data.colour' is not a known field, got 'red'",
    )
  })

  it('bounds strings and requires fields', () => {
    expect(
      detail({ ...reading, data: { ...reading.data, unit: 'x'.repeat(17) } }).detail,
    ).toContain("'data.unit' must match")
    const { hlc: _hlc, ...noHlc } = reading
    expect(detail(noHlc).detail).toBe("'hlc' is required (string)")
    expect(detail({ ...reading, version: 2 }).detail).toBe("'version' must be 1, got 2")
    expect(detail({ ...reading, occurredAt: 'yesterday' }).detail).toContain(
      "'occurredAt' must be an ISO 8601 date-time",
    )
  })

  it('refuses bad JSON and bodies that disagree with their subject or msg id', () => {
    expect(detail('{"eventId":').reason).toBe('invalid-json')
    expect(detail(reading, 'fleet.events.sensor-8.reading').detail).toBe(
      "'deviceId' must equal the subject's device token 'sensor-8', got 'sensor-7'",
    )
    expect(detail(reading, 'fleet.events.sensor-7.status').detail).toContain(
      "subject kind must be 'reading'",
    )
    const d = decode(reading, 'fleet.events.sensor-7.reading', 'other-id')
    expect(d.ok).toBe(false)
  })

  it('lists every problem at once', () => {
    const err = (() => {
      try {
        parseOrThrow(
          FleetEvent,
          { ...reading, deviceId: 'A B', data: { metric: 'Temp', value: 'hot', unit: 'C' } },
          'event',
        )
      } catch (e) {
        return e as ValidationError
      }
      throw new Error('expected a ValidationError')
    })()
    expect(err.problems).toEqual([
      "'deviceId' must match /^[a-z0-9-]{1,64}$/, got 'A B'",
      "'data.metric' must match /^[a-z][a-z0-9_]{0,63}$/, got 'Temp'",
      "'data.value' must be a number, got 'hot'",
    ])
  })

  it('parses subjects only of the contract shape', () => {
    expect(parseEventSubject('fleet.events.sensor-7.reading')).toEqual({
      deviceId: 'sensor-7',
      kind: 'reading',
    })
    expect(parseEventSubject('fleet.events.sensor-7.reading.extra')).toBeUndefined()
    expect(parseEventSubject('fleet.events.Sensor_7.reading')).toBeUndefined()
  })
})
