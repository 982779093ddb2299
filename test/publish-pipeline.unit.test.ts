import { describe, expect, it } from 'vitest'
import { PublishPipeline } from '../infra/publisher.ts'

/** A publish that settles when told to. */
function deferred() {
  let settle!: (v: number) => void
  let fail!: (e: Error) => void
  const promise = new Promise<number>((resolve, reject) => {
    settle = resolve
    fail = reject
  })
  return { promise, settle, fail }
}

describe('PublishPipeline', () => {
  it('keeps at most `window` publishes in flight and reports every result', async () => {
    const results: number[] = []
    const pipe = new PublishPipeline<number>(3, (r) => results.push(r))
    const pending = Array.from({ length: 10 }, () => deferred())
    let started = 0
    let most = 0
    const submitting = (async () => {
      for (const d of pending) {
        await pipe.submit(() => {
          started++
          most = Math.max(most, pipe.inFlight)
          return d.promise
        })
      }
    })()
    for (let i = 0; i < pending.length; i++) {
      await new Promise((r) => setTimeout(r, 1))
      expect(started - i).toBeLessThanOrEqual(3)
      pending[i]!.settle(i)
    }
    await submitting
    await pipe.drain()
    expect(most).toBe(3)
    expect(results.sort((a, b) => a - b)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    expect(pipe.inFlight).toBe(0)
  })

  it('throws the first failure from drain and from later submits', async () => {
    const pipe = new PublishPipeline<number>(2)
    await pipe.submit(() => Promise.reject(new Error('first')))
    await expect(pipe.drain()).rejects.toThrow('first')
    await expect(pipe.submit(() => Promise.resolve(1))).rejects.toThrow('first')
    expect(pipe.inFlight).toBe(0)
  })

  it('a start that throws is a failure and frees its place', async () => {
    const pipe = new PublishPipeline<number>(1)
    await pipe.submit(() => {
      throw new Error('synchronous')
    })
    await expect(pipe.drain()).rejects.toThrow('synchronous')
    expect(pipe.inFlight).toBe(0)
  })

  it('a result callback that throws is a failure, not an unhandled rejection', async () => {
    const pipe = new PublishPipeline<number>(2, () => {
      throw new Error('callback')
    })
    await pipe.submit(() => Promise.resolve(1))
    await expect(pipe.drain()).rejects.toThrow('callback')
  })

  it('drain with nothing in flight returns at once', async () => {
    await new PublishPipeline<number>(4).drain()
  })
})
