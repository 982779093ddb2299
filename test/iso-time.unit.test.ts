import { describe, expect, it } from 'vitest'
import { isoTime } from '../projections/iso-time.ts'

describe('isoTime', () => {
  it("is the Date's ISO string, whether the millisecond before was the same or not", () => {
    const times = [0, 1_764_000_000_000, 1_764_000_000_000, 1_764_000_000_001, 0, -1, 8.64e15]
    for (const ms of times) expect(isoTime(new Date(ms))).toBe(new Date(ms).toISOString())
  })

  it('is what JSON.stringify makes of the Date, so a row says the same with either', () => {
    const d = new Date(1_764_000_123_456)
    expect(JSON.stringify({ at: isoTime(d) })).toBe(JSON.stringify({ at: d }))
  })
})
