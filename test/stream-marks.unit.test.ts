import type { JsMsg } from '@nats-io/jetstream'
import { describe, expect, it } from 'vitest'
import { MarkDigest, markOf } from '../processors/progress/stream-marks.ts'
import { subjectMatches } from '../schemas/subjects.ts'

const enc = new TextEncoder()
const SUBJECT = 'fleet.events.s1.reading'
const msg = (seq: number, body = `event-${seq}`, subject = SUBJECT) =>
  ({ info: { streamSequence: seq }, subject, data: enc.encode(body) }) as unknown as JsMsg
const digestOf = (...bodies: string[]) => {
  const d = new MarkDigest()
  for (const b of bodies) d.add(SUBJECT, enc.encode(b))
  return d.digest()
}

describe('stream marks', () => {
  it('mark a commit by every message of its range (from, to], in stream order', () => {
    const batch = [msg(3), msg(5), msg(8), msg(9)]
    expect(markOf(batch, 3, 8)).toEqual({
      fromSeq: 3,
      lastSeq: 8,
      messages: 2,
      digest: digestOf('event-5', 'event-8'),
      lastDigest: digestOf('event-8'),
    })
    expect(markOf(batch, 9, 12)).toBeUndefined() // nothing of the batch in that range
  })

  it('tell apart the same ends with another middle, another order, or a split body', () => {
    const a = digestOf('first', 'middle', 'last')
    expect(digestOf('first', 'middle', 'last')).toBe(a)
    expect(digestOf('first', 'other', 'last')).not.toBe(a)
    expect(digestOf('middle', 'first', 'last')).not.toBe(a)
    expect(digestOf('firstmiddle', 'last')).not.toBe(digestOf('first', 'middlelast'))
    const other = new MarkDigest()
    other.add('fleet.events.s2.reading', enc.encode('first'))
    expect(other.digest()).not.toBe(digestOf('first'))
  })

  it('match subjects as NATS filters do', () => {
    expect(subjectMatches('fleet.events.*.reading', 'fleet.events.s1.reading')).toBe(true)
    expect(subjectMatches('fleet.events.*.reading', 'fleet.events.s1.heartbeat')).toBe(false)
    expect(subjectMatches('fleet.events.*.reading', 'fleet.events.1.s1.reading')).toBe(false)
    expect(subjectMatches('fleet.events.>', 'fleet.events.1.s1.reading')).toBe(true)
    expect(subjectMatches('fleet.events.>', 'fleet.events')).toBe(false)
    expect(subjectMatches('fleet.events.1.*.*', 'fleet.events.1.s1.reading')).toBe(true)
    expect(subjectMatches('fleet.events.1.*.*', 'fleet.events.2.s1.reading')).toBe(false)
  })
})
