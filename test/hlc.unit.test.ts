import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import {
  ClockSkewError,
  compareHlc,
  decodeHlc,
  encodeHlc,
  HlcFormatError,
  HybridLogicalClock,
  MAX_LOGICAL,
  MAX_WALL_MS,
  type Hlc,
} from '../schemas/hlc.ts'

const node = fc.stringMatching(/^[a-z0-9-]{1,12}$/)
const hlc: fc.Arbitrary<Hlc> = fc.record({
  wallMs: fc.integer({ min: 0, max: MAX_WALL_MS }),
  logical: fc.integer({ min: 0, max: MAX_LOGICAL }),
  node,
})
const sign = (n: number) => Math.sign(n)

/** A physical clock driven by the test: it can stall and step backwards. */
function steppedClock(start: number) {
  let t = start
  return { now: () => t, step: (d: number) => (t = Math.max(0, t + d)) }
}

describe('HLC encoding', () => {
  it('decodes what it encodes', () => {
    fc.assert(
      fc.property(hlc, (h) => {
        expect(decodeHlc(encodeHlc(h))).toEqual(h)
      }),
    )
  })

  it('sorts as strings exactly as the clock compares', () => {
    fc.assert(
      fc.property(hlc, hlc, (a, b) => {
        const ea = encodeHlc(a)
        const eb = encodeHlc(b)
        expect(sign(ea < eb ? -1 : ea > eb ? 1 : 0)).toBe(sign(compareHlc(a, b)))
      }),
    )
  })

  it('refuses malformed strings and values with the rule and the value', () => {
    expect(() => decodeHlc('12-3-x')).toThrow(HlcFormatError)
    expect(() => decodeHlc('12-3-x')).toThrow("got '12-3-x'")
    expect(() => encodeHlc({ wallMs: -1, logical: 0, node: 'a' })).toThrow(
      "'wallMs' must be an integer",
    )
    expect(() => encodeHlc({ wallMs: 1, logical: 0, node: 'Bad Node' })).toThrow(
      "'node' must match /^[a-z0-9-]{1,64}$/, got 'Bad Node'",
    )
  })
})

describe('HybridLogicalClock', () => {
  it('is strictly monotonic while the physical clock stalls or goes backwards', () => {
    fc.assert(
      fc.property(fc.array(fc.integer({ min: -5000, max: 5000 }), { maxLength: 300 }), (steps) => {
        const phys = steppedClock(1_700_000_000_000)
        const clock = new HybridLogicalClock({ node: 'a', maxOffsetMs: 500, physicalNow: phys.now })
        let prev = clock.now()
        for (const d of steps) {
          phys.step(d)
          const next = clock.now()
          expect(compareHlc(next, prev)).toBe(1)
          expect(next.wallMs).toBeGreaterThanOrEqual(phys.now())
          prev = next
        }
      }),
    )
  })

  it('keeps causality across services: a receive is later than the message and everything before', () => {
    // Three services with skewed clocks (within max offset) exchange messages in a random order.
    const op = fc.record({
      from: fc.integer({ min: 0, max: 2 }),
      to: fc.integer({ min: 0, max: 2 }),
      tick: fc.integer({ min: -50, max: 200 }),
    })
    fc.assert(
      fc.property(
        fc.array(op, { maxLength: 200 }),
        fc.array(fc.integer({ min: -200, max: 200 }), { minLength: 3, maxLength: 3 }),
        (ops, skews) => {
          let base = 1_700_000_000_000
          const clocks = skews.map(
            (skew, i) =>
              new HybridLogicalClock({
                node: `svc-${i}`,
                maxOffsetMs: 500,
                physicalNow: () => base + skew,
              }),
          )
          const lastSeen = clocks.map((c) => c.now())
          for (const { from, to, tick } of ops) {
            base += tick
            const sender = clocks[from]!
            const receiver = clocks[to]!
            const sent = sender.now()
            expect(compareHlc(sent, lastSeen[from]!)).toBe(1)
            lastSeen[from] = sent
            const received = receiver.receive(sent)
            expect(compareHlc(received, sent)).toBe(1)
            expect(compareHlc(received, lastSeen[to]!)).toBe(1)
            lastSeen[to] = received
          }
        },
      ),
    )
  })

  it('rejects a remote time beyond max offset without moving the clock', () => {
    const phys = steppedClock(1_700_000_000_000)
    const clock = new HybridLogicalClock({ node: 'a', maxOffsetMs: 500, physicalNow: phys.now })
    const before = clock.now()
    const ahead: Hlc = { wallMs: phys.now() + 501, logical: 0, node: 'b' }
    expect(() => clock.receive(ahead)).toThrow(ClockSkewError)
    expect(() => clock.receive(ahead)).toThrow('501 ms ahead')
    expect(clock.last).toEqual(before)
    // Within the offset it is adopted and the clock moves past it.
    const near: Hlc = { wallMs: phys.now() + 500, logical: 7, node: 'b' }
    expect(clock.receive(near)).toEqual({ wallMs: near.wallMs, logical: 8, node: 'a' })
  })

  it('resumes after a restart from its durable high-water mark, never earlier', () => {
    const last = '1700000005000-000003-a'
    const clock = new HybridLogicalClock({
      node: 'a',
      maxOffsetMs: 500,
      physicalNow: () => 1_700_000_000_000,
      last,
    })
    expect(encodeHlc(clock.now())).toBe('1700000005000-000004-a')
  })

  it('carries a full logical counter into the wall time and stays ordered', () => {
    const clock = new HybridLogicalClock({
      node: 'a',
      maxOffsetMs: 500,
      physicalNow: () => 1000,
      last: { wallMs: 1000, logical: MAX_LOGICAL, node: 'a' },
    })
    const next = clock.now()
    expect(next).toEqual({ wallMs: 1001, logical: 0, node: 'a' })
    expect(compareHlc(next, { wallMs: 1000, logical: MAX_LOGICAL, node: 'a' })).toBe(1)
  })
})
