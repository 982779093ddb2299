import { jetstreamManager, type JetStreamManager } from '@nats-io/jetstream'
import { connect, type NatsConnection } from '@nats-io/transport-node'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { type BenchEvent, stampReading } from '../bench/common.ts'
import { publishCeiling } from '../bench/publish-ceiling.ts'
import { createPublisher } from '../infra/publisher.ts'
import { HybridLogicalClock } from '../schemas/hlc.ts'
import { startNatsServer, type NatsServer } from './harness/test-servers.ts'

/**
 * The bench's (a'): ingest's messages on a bare socket. It must store every event once, read every
 * PubAck, and fail (not report a figure) when the stream refuses messages.
 */
describe('bench publish ceiling', () => {
  let ns: NatsServer
  let nc: NatsConnection
  let jsm: JetStreamManager
  beforeEach(async () => {
    ns = await startNatsServer()
    nc = await connect({ servers: ns.url, noAsyncTraces: true })
    jsm = await jetstreamManager(nc)
  })
  afterEach(async () => {
    await nc.close()
    await ns.cleanup()
  })

  const events = (n: number): BenchEvent[] => {
    const publisher = createPublisher(nc, {
      clock: new HybridLogicalClock({ node: 'test', maxOffsetMs: 500 }),
    })
    return Array.from({ length: n }, (_, i) => stampReading(publisher, i, 50))
  }
  const target = (stream: string) => ({
    natsUrl: ns.url,
    natsPid: ns.pid,
    jsm,
    stream,
    subjectPrefix: 'ceiling.',
  })

  it('stores every event once, with its Nats-Msg-Id, a window at a time', async () => {
    await jsm.streams.add({ name: 'CEIL', subjects: ['ceiling.>'] })
    const batch = events(3000)
    const r = await publishCeiling(target('CEIL'), batch, 256)
    expect(r.seconds).toBeGreaterThan(0)
    expect((await jsm.streams.info('CEIL')).state.messages).toBe(3000)
    // The same messages again: every one is a duplicate, so the stream stores none.
    await expect(publishCeiling(target('CEIL'), batch, 256)).rejects.toThrow(
      'CEIL stored 0 of 3000',
    )
    const last = await jsm.streams.getMessage('CEIL', { seq: 3000 })
    expect(last?.header.get('Nats-Msg-Id')).toBe(batch[2999]?.event.eventId)
    expect(last?.header.get('Fleet-Hlc')).toBe(batch[2999]?.event.hlc)
  })

  it('fails naming the PubAck when the stream refuses a message', async () => {
    await jsm.streams.add({ name: 'SMALL', subjects: ['ceiling.>'], max_msg_size: 100 })
    await expect(publishCeiling(target('SMALL'), events(10), 4)).rejects.toThrow(
      /publish ceiling: the stream refused a message: .*message size exceeds maximum/,
    )
  })
})
