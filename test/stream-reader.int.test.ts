import { jetstream, jetstreamManager, type JetStreamClient } from '@nats-io/jetstream'
import { connect, type NatsConnection } from '@nats-io/transport-node'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { StreamReader } from '../processors/stream-reader.ts'
import { startNatsServer, type NatsServer } from './harness/test-servers.ts'

describe('StreamReader', () => {
  let nats: NatsServer
  let nc: NatsConnection
  let js: JetStreamClient
  beforeAll(async () => {
    nats = await startNatsServer()
    nc = await connect({ servers: nats.url })
    const jsm = await jetstreamManager(nc)
    await jsm.streams.add({ name: 'R', subjects: ['r.>'] })
    js = jetstream(nc)
    // More than the client's buffer and the read-ahead together, two subjects interleaved.
    const acks = []
    for (let i = 1; i <= 5000; i++) acks.push(js.publish(i % 2 === 0 ? 'r.even' : 'r.odd', `${i}`))
    await Promise.all(acks)
  })
  afterAll(async () => {
    await nc.close()
    await nats.cleanup()
  })

  it('hands out every message of its subject once, in stream order, buffered ones without waiting', async () => {
    const reader = await StreamReader.open(js, 'R', 'r.even', { seq: 1 }, { bufferSize: 300 })
    const seen: number[] = []
    let polled = 0
    for (;;) {
      const ready = reader.poll()
      if (ready !== undefined) polled++
      const m = ready ?? (await reader.next(500))
      if (m === undefined) break
      expect(m.info.streamSequence).toBe(reader.lastSeq)
      seen.push(Number(new TextDecoder().decode(m.data)))
    }
    expect(seen).toEqual(Array.from({ length: 2500 }, (_, i) => 2 * (i + 1)))
    // Most messages were already in hand when asked for.
    expect(polled).toBeGreaterThan(1000)
    expect(reader.pending).toBe(0)
    expect(await reader.drained()).toBe(true)

    // A message stored later wakes a waiting `next`; then nothing more.
    const waiting = reader.next(10_000)
    await js.publish('r.even', '5002')
    const late = await waiting
    expect(late?.info.streamSequence).toBe(5001)
    expect(await reader.next(50)).toBeUndefined()
    expect(await reader.drained()).toBe(true)
    await reader.close()
  })

  it('reads a long range once, in order, however its buffer fills and empties', async () => {
    const reader = await StreamReader.open(js, 'R', 'r.>', { seq: 1 }, { bufferSize: 2000 })
    let expected = 1
    for (let m = await reader.next(500); m; m = reader.poll() ?? (await reader.next(500))) {
      expect(m.info.streamSequence).toBe(expected++)
    }
    expect(expected - 1).toBe(5001)
    await reader.close()
  })

  it('starts at a stream sequence; a closed reader says so', async () => {
    const reader = await StreamReader.open(js, 'R', 'r.>', { seq: 4990 })
    const first = await reader.next(5000)
    expect(first?.info.streamSequence).toBe(4990)
    await reader.close()
    await expect(async () => {
      for (let i = 0; i < 100; i++) await reader.next(20)
    }).rejects.toThrow('the stream reader stopped')
  })
})
