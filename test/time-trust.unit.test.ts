import type { JsMsg } from '@nats-io/jetstream'
import { headers as natsHeaders } from '@nats-io/transport-node'
import { describe, expect, it } from 'vitest'
import { loadConfig } from '../infra/config.ts'
import { decide } from '../processors/decision.ts'
import { encodeHlc } from '../schemas/hlc.ts'
import { Headers } from '../schemas/subjects.ts'

/**
 * Time a device (or anyone who can publish) claims is held to the stream's append time, the one
 * clock every message shares and a replay sees again: an HLC or a tick may be at most
 * HLC_MAX_OFFSET_MS ahead of it and at most HLC_MAX_AGE_MS behind it.
 */
const config = loadConfig({})
const appendMs = Date.parse('2026-11-23T10:00:00.000Z')
const DAY = 24 * 3600 * 1000

/** A message as the consumer hands it over: what decide() reads of it. */
function message(
  body: Record<string, unknown>,
  opts: { subject?: string; hlcHeader?: string; appendMs?: number } = {},
): JsMsg {
  const h = natsHeaders()
  h.set(Headers.MsgId, body.eventId as string)
  if (opts.hlcHeader !== undefined) h.set(Headers.Hlc, opts.hlcHeader)
  return {
    subject: opts.subject ?? 'fleet.events.sensor-7.reading',
    data: new TextEncoder().encode(JSON.stringify(body)),
    headers: h,
    info: { streamSequence: 7, timestampNanos: (opts.appendMs ?? appendMs) * 1e6 },
  } as unknown as JsMsg
}
const hlcAt = (wallMs: number, node = 'gw-1') => encodeHlc({ wallMs, logical: 0, node })
const reading = (hlc: string) => ({
  eventId: 'e-1',
  deviceId: 'sensor-7',
  type: 'reading.recorded',
  version: 1,
  occurredAt: '2026-11-23T10:00:00.000Z',
  hlc,
  correlationId: 'e-1',
  data: { metric: 'temperature', value: 21.5, unit: 'C' },
})
const tick = (at: string, hlc = hlcAt(appendMs)) => ({
  eventId: `tick-${Date.parse(at)}`,
  deviceId: '_system',
  type: 'clock.ticked',
  version: 1,
  occurredAt: at,
  hlc,
  correlationId: `tick-${Date.parse(at)}`,
  data: { at, intervalSeconds: 10 },
})
const TICK = 'fleet.events._system.tick'
const READINGS = { name: 'readings', reads: 'reading' } as const
const STATUS = { name: 'sensor-status', reads: 'all' } as const

describe('time a message claims is held to the stream', () => {
  it('refuses a tick whose data.at is a year ahead of the append time, even with a current HLC', () => {
    const yearAhead = new Date(appendMs + 365 * DAY).toISOString()
    const d = decide(message(tick(yearAhead), { subject: TICK }), STATUS, config)
    expect(d).toEqual({
      kind: 'refuse',
      reason: 'clock-skew',
      detail: `'data.at' '${yearAhead}' is ${365 * DAY} ms ahead of the stream's append time 2026-11-23T10:00:00.000Z, more than the max offset of 500 ms (HLC_MAX_OFFSET_MS)`,
    })
  })

  it('applies a tick within the max offset, and one a little behind (published after its boundary)', () => {
    for (const at of [appendMs + 400, appendMs - 3_000]) {
      const d = decide(message(tick(new Date(at).toISOString()), { subject: TICK }), STATUS, config)
      expect(d.kind, new Date(at).toISOString()).toBe('apply')
    }
  })

  it('refuses a tick older than the max age', () => {
    const old = new Date(appendMs - 30 * DAY).toISOString()
    const d = decide(message(tick(old), { subject: TICK }), STATUS, config)
    expect(d).toMatchObject({ kind: 'refuse', reason: 'clock-skew' })
    expect(d.kind === 'refuse' && d.detail).toBe(
      `'data.at' '${old}' is ${30 * DAY} ms behind the stream's append time 2026-11-23T10:00:00.000Z, more than the max age of ${7 * DAY} ms (HLC_MAX_AGE_MS)`,
    )
  })

  it('refuses an HLC from 2001 and an HLC of 0, naming the HLC and the bound', () => {
    const from2001 = hlcAt(Date.parse('2001-09-09T01:46:40.000Z'))
    const d2001 = decide(message(reading(from2001)), READINGS, config)
    expect(d2001).toMatchObject({ kind: 'refuse', reason: 'clock-skew' })
    expect(d2001.kind === 'refuse' && d2001.detail).toBe(
      `HLC '${from2001}' is ${appendMs - 1_000_000_000_000} ms behind the reference clock, more than the max age of ${7 * DAY} ms`,
    )
    const zero = '0000000000000-000000-gw-1'
    const d0 = decide(message(reading(zero)), READINGS, config)
    expect(d0).toMatchObject({ kind: 'refuse', reason: 'clock-skew' })
    expect(d0.kind === 'refuse' && d0.detail).toContain(`HLC '${zero}' is ${appendMs} ms behind`)
  })

  it('applies an HLC a device held while offline for six days (buffered, replayed on reconnect)', () => {
    expect(decide(message(reading(hlcAt(appendMs - 6 * DAY))), READINGS, config).kind).toBe('apply')
    const shorter = loadConfig({ HLC_MAX_AGE_MS: String(DAY) })
    expect(decide(message(reading(hlcAt(appendMs - 2 * DAY))), READINGS, shorter)).toMatchObject({
      kind: 'refuse',
      reason: 'clock-skew',
    })
  })

  it('decides by the append time, not the wall clock: a replay years later decides the same', () => {
    const old = Date.parse('2020-01-01T00:00:00.000Z')
    const msg = message(reading(hlcAt(old + 100)), { appendMs: old })
    expect(decide(msg, READINGS, config).kind).toBe('apply')
    expect(decide(msg, READINGS, config).kind).toBe('apply')
  })

  it('refuses a Fleet-Hlc header that disagrees with the body, naming both values', () => {
    const body = hlcAt(appendMs)
    const header = hlcAt(appendMs - 5_000, 'other-gw')
    const d = decide(message(reading(body), { hlcHeader: header }), READINGS, config)
    expect(d).toEqual({
      kind: 'refuse',
      reason: 'subject-mismatch',
      detail: `header 'Fleet-Hlc' must equal 'hlc' '${body}', got '${header}'`,
    })
    expect(decide(message(reading(body), { hlcHeader: body }), READINGS, config).kind).toBe('apply')
    // MQTT devices cannot set headers: no header is no disagreement.
    expect(decide(message(reading(body)), READINGS, config).kind).toBe('apply')
  })
})

describe('a copy an operator put back from the DLQ', () => {
  it('is not held to the max age: it is appended again, maybe weeks after the original', () => {
    const msg = message(reading(hlcAt(appendMs - 20 * DAY)), {
      subject: 'fleet.events.sensor-7.reading.redrive.readings',
    })
    expect(decide(msg, READINGS, config).kind).toBe('apply')
  })
})
