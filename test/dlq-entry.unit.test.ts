import type { JsMsg } from '@nats-io/jetstream'
import { headers, type MsgHdrs } from '@nats-io/transport-node'
import { describe, expect, it } from 'vitest'
import { jsonDepth } from '../processors/dlq/inspect.ts'
import { decide } from '../processors/decision.ts'
import {
  deadLetterEntry,
  headerText,
  originalHeaders,
  parkedKey,
  unescapeHeaderText,
} from '../processors/dlq/park.ts'
import { parseRedrive, redriveSubject } from '../schemas/subjects.ts'

/** A message as a consumer delivers it, enough for the DLQ and decide(). */
function delivered(subject: string, data: string, h?: MsgHdrs, seq = 7): JsMsg {
  return {
    subject,
    data: new TextEncoder().encode(data),
    headers: h,
    info: {
      stream: 'FLEET_EVENTS',
      streamSequence: seq,
      deliveryCount: 1,
      timestampNanos: Date.now() * 1e6,
    },
  } as unknown as JsMsg
}

/** The header block as nats-server sees it. */
const wire = (h: MsgHdrs) => (h as unknown as { toString(): string }).toString()

const LIMITS = { maxEntryBytes: 16 * 1024 + 8 * 1024 }

describe('a DLQ entry', () => {
  it('carries its own Nats-Msg-Id first and no other text the server would read as a Nats-* header', () => {
    const h = headers()
    h.set('Nats-Msg-Id', 'evt-1')
    h.set('Fleet-Dlq-Original-Nats-Msg-Id', 'same')
    h.set('X-Nats-Msg-Id', 'same')
    h.set('X-Note', 'Nats-Rollup:all')
    h.set('nats-expected-stream', 'OTHER')
    const e = deadLetterEntry(
      {
        processor: 'readings',
        msg: delivered('fleet.events.Nats-Expected-Last-Msg-Id:x.reading', 'not json', h),
        reason: 'invalid-json',
        detail: "got 'Nats-TTL: 1s'\r\nNats-Rollup: sub",
        attempts: 1,
      },
      LIMITS,
    )
    const block = wire(e.headers)
    // nats-server 2.9 takes the first occurrence of `<name>:` anywhere in the block.
    expect(block.indexOf('Nats-Msg-Id:')).toBe('NATS/1.0\r\n'.length)
    expect(e.headers.get('Nats-Msg-Id')).toBe('readings:evt-1')
    expect(block.match(/nats-/gi)).toEqual(['Nats-'])
    // Nothing is lost: the original headers read back as they were.
    expect(originalHeaders(e.headers)).toEqual([
      ['Nats-Msg-Id', 'evt-1'],
      ['Fleet-Dlq-Original-Nats-Msg-Id', 'same'],
      ['X-Nats-Msg-Id', 'same'],
      ['X-Note', 'Nats-Rollup:all'],
      ['nats-expected-stream', 'OTHER'],
    ])
    expect(unescapeHeaderText(e.headers.get('Fleet-Dlq-Subject'))).toBe(
      'fleet.events.Nats-Expected-Last-Msg-Id:x.reading',
    )
  })

  it('is bounded whatever the input, and says what was cut', () => {
    const h = headers()
    for (let i = 0; i < 1200; i++) h.append('Nats-X', 'y')
    const body = 'x'.repeat(16 * 1024)
    const e = deadLetterEntry(
      {
        processor: 'alerts',
        msg: delivered('fleet.events.a-1.reading', body, h),
        reason: 'invalid-json',
        detail: 'd'.repeat(100_000),
        attempts: 1,
      },
      { maxEntryBytes: 12 * 1024 },
    )
    expect(Buffer.byteLength(wire(e.headers)) + e.data.length).toBeLessThanOrEqual(12 * 1024)
    expect(e.cut).toEqual(['headers', 'body'])
    expect(e.headers.get('Fleet-Dlq-Headers-Cut')).toMatch(/^kept \d+ of 1200$/)
    expect(e.headers.get('Fleet-Dlq-Body-Cut')).toBe(
      `kept ${e.data.length} of ${body.length} bytes`,
    )
    expect(e.headers.get('Fleet-Dlq-Stream-Seq')).toBe('7')

    const stub = deadLetterEntry(
      {
        processor: 'alerts',
        msg: delivered('fleet.events.a-1.reading', body, h),
        reason: 'invalid-json',
        detail: 'x',
        attempts: 1,
      },
      LIMITS,
      { stub: true },
    )
    expect(stub.data.length).toBe(0)
    expect(originalHeaders(stub.headers)).toEqual([])
    expect(stub.headers.get('Fleet-Dlq-Headers-Cut')).toBe('kept 0 of 1200')
  })

  it('is keyed by the eventId, or by a digest of a msg id a device made long or odd', () => {
    const withId = (id: string) => {
      const h = headers()
      h.set('Nats-Msg-Id', id)
      return delivered('fleet.events.a-1.reading', '{}', h)
    }
    expect(parkedKey(withId('3f1c2b9a-0000-4000-8000-000000000001'))).toBe(
      '3f1c2b9a-0000-4000-8000-000000000001',
    )
    expect(parkedKey(withId('x Nats-Rollup:all'))).toMatch(/^sha256:[0-9a-f]{64}$/)
    expect(parkedKey(withId('a'.repeat(500)))).toMatch(/^sha256:[0-9a-f]{64}$/)
    expect(parkedKey(delivered('fleet.events.a-1.reading', '{}'))).toBe('FLEET_EVENTS:7')
  })

  it('escapes and cuts header text without splitting an escape', () => {
    expect(headerText(' 100% nats-y\n', 100)).toBe('%20100%25 nats%2Dy%0A')
    expect(unescapeHeaderText(headerText(' 100% nats-y\n', 100))).toBe(' 100% nats-y\n')
    const cut = headerText('%'.repeat(50), 20)
    expect(Buffer.byteLength(cut)).toBeLessThanOrEqual(20)
    expect(cut).toMatch(/^(%25)+…$/)
  })
})

describe('redrive markers', () => {
  const config = { hlcMaxOffsetMs: 500, hlcMaxAgeMs: 7 * 24 * 3600 * 1000, partitions: 0 }
  const readings = { name: 'readings', reads: 'reading' } as const
  const status = { name: 'sensor-status', reads: 'all' } as const

  it('come from the subject only', () => {
    expect(redriveSubject('fleet.events.s-1.reading', 'readings')).toBe(
      'fleet.events.s-1.reading.redrive.readings',
    )
    expect(parseRedrive('fleet.events.2.s-1.reading.redrive.readings')).toEqual({
      subject: 'fleet.events.2.s-1.reading',
      processor: 'readings',
    })
    expect(parseRedrive('fleet.events.s-1.reading')).toBeUndefined()
    expect(parseRedrive('fleet.dlq.x.y.redrive.readings')).toBeUndefined()

    const h = headers()
    h.set('Fleet-Redrive-For', 'nobody')
    const device = delivered('fleet.events.s-1.reading', 'not json', h)
    expect(decide(device, status, config).kind).toBe('refuse')
    expect(decide(device, readings, config).kind).toBe('refuse')
    const copy = delivered('fleet.events.s-1.reading.redrive.readings', 'not json')
    expect(decide(copy, status, config).kind).toBe('skip')
    expect(decide(copy, readings, config).kind).toBe('refuse')
    // Kinds a processor does not read are skipped, as its old kind filter did.
    expect(decide(delivered('fleet.events.s-1.heartbeat', 'x'), readings, config).kind).toBe('skip')
  })
})

describe('dlq show and list', () => {
  it('measure nesting without recursion, outside strings', () => {
    expect(jsonDepth(`${'['.repeat(5000)}${']'.repeat(5000)}`)).toBe(5000)
    expect(jsonDepth('{"a": "[[[[", "b": [1, {"c": "\\"{"}]}')).toBe(3)
  })
})
