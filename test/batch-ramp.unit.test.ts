import { describe, expect, it } from 'vitest'
import { batchRamp, FIRST_BATCH } from '../processors/runner/pipeline.ts'

describe('batchRamp', () => {
  it('starts small and doubles up to the configured batch size, then stays there', () => {
    const ramp = batchRamp(1000)
    const sizes = Array.from({ length: 8 }, () => ramp.next())
    expect(sizes).toEqual([FIRST_BATCH, 128, 256, 512, 1000, 1000, 1000, 1000])
  })

  it('never exceeds a configured batch size below the first step', () => {
    const ramp = batchRamp(10)
    expect([ramp.next(), ramp.next()]).toEqual([10, 10])
  })
})
