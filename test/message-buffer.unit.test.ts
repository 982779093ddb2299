import type { JsMsg } from '@nats-io/jetstream'
import { describe, expect, it } from 'vitest'
import { MessageBuffer } from '../processors/runner/consumer.ts'

/** The buffer only holds messages: a numbered stand-in is enough to follow them. */
const msg = (n: number) => ({ n }) as unknown as JsMsg
const numbers = (batch: JsMsg[]) => batch.map((m) => (m as unknown as { n: number }).n)

describe('MessageBuffer.take', () => {
  const live = new AbortController().signal

  it('with nothing committing and no linger, takes what is there at once', async () => {
    const buffer = new MessageBuffer()
    buffer.push(msg(1))
    buffer.push(msg(2))
    expect(numbers(await buffer.take(10, 0, live))).toEqual([1, 2])
  })

  it('waits while the commit before it runs, then takes what arrived meanwhile', async () => {
    const buffer = new MessageBuffer()
    let commitDone = () => {}
    const committing = new Promise<void>((resolve) => {
      commitDone = resolve
    })
    buffer.push(msg(1))
    const taken = buffer.take(10, 0, live, committing)
    buffer.push(msg(2))
    await new Promise((r) => setTimeout(r, 20))
    buffer.push(msg(3))
    commitDone()
    expect(numbers(await taken)).toEqual([1, 2, 3])
  })

  it('a failed commit before it ends the wait as well', async () => {
    const buffer = new MessageBuffer()
    buffer.push(msg(1))
    const failed = Promise.reject(new Error('commit failed'))
    failed.catch(() => undefined)
    expect(numbers(await buffer.take(10, 0, live, failed))).toEqual([1])
  })

  it('a full batch does not wait for the commit before it', async () => {
    const buffer = new MessageBuffer()
    const never = new Promise<void>(() => {})
    for (let i = 1; i <= 3; i++) buffer.push(msg(i))
    const taken = buffer.take(4, 0, live, never)
    buffer.push(msg(4))
    buffer.push(msg(5))
    expect(numbers(await taken)).toEqual([1, 2, 3, 4])
    expect(buffer.size).toBe(1)
  })

  it('lingers at least lingerMs for a full batch once the first message is in', async () => {
    const buffer = new MessageBuffer()
    buffer.push(msg(1))
    const started = performance.now()
    const taken = buffer.take(10, 40, live)
    setTimeout(() => {
      buffer.push(msg(2))
    }, 10)
    expect(numbers(await taken)).toEqual([1, 2])
    expect(performance.now() - started).toBeGreaterThanOrEqual(35)
  })

  it('stops lingering once the batch holds a quarter of its maximum', async () => {
    const buffer = new MessageBuffer()
    buffer.push(msg(1))
    // A linger no test waits out: only the fill can end it.
    const taken = buffer.take(8, 60_000, live)
    buffer.push(msg(2))
    expect(buffer.size).toBe(2)
    expect(numbers(await taken)).toEqual([1, 2])
  })

  it('a quarter full does not end the wait while the commit before it runs', async () => {
    const buffer = new MessageBuffer()
    let commitDone = () => {}
    const committing = new Promise<void>((resolve) => {
      commitDone = resolve
    })
    for (let i = 1; i <= 3; i++) buffer.push(msg(i))
    const taken = buffer.take(8, 60_000, live, committing)
    await new Promise((r) => setTimeout(r, 10))
    buffer.push(msg(4))
    commitDone()
    expect(numbers(await taken)).toEqual([1, 2, 3, 4])
  })

  it('counts the linger from the oldest message: what waited through the commit before is taken once it settles', async () => {
    const buffer = new MessageBuffer()
    buffer.push(msg(1))
    await new Promise((r) => setTimeout(r, 40))
    // Its oldest message has waited longer than the linger already: nothing more is waited for.
    const taken = buffer.take(100, 20, live)
    buffer.push(msg(2))
    expect(numbers(await taken)).toEqual([1])
    expect(buffer.size).toBe(1)
  })

  it('an abort ends the wait with nothing taken', async () => {
    const buffer = new MessageBuffer()
    const stop = new AbortController()
    const taken = buffer.take(10, 0, stop.signal)
    stop.abort()
    expect(await taken).toEqual([])
  })
})
