import { jetstream, jetstreamManager, type JetStreamManager } from '@nats-io/jetstream'
import { connect, type NatsConnection } from '@nats-io/transport-node'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import {
  createPublisher,
  PublishError,
  PublishPipeline,
  type Publisher,
  type PublisherOptions,
  type PublishResult,
} from '../infra/publisher.ts'
import type { FleetEvent } from '../schemas/events.ts'
import { HybridLogicalClock } from '../schemas/hlc.ts'
import { startNatsServer, type NatsServer } from './harness/test-servers.ts'
import { readingDraft, waitFor } from './fixtures.ts'

/**
 * The pipelined publisher against a real nats-server: every PubAck is checked, per event, and a
 * lost PubAck is sent again under the same Nats-Msg-Id, which the stream stores once.
 */
describe('publisher PubAcks', () => {
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

  const stream = (extra: { max_msg_size?: number; no_ack?: boolean } = {}) =>
    jsm.streams.add({
      name: 'EVENTS',
      subjects: ['fleet.events.>'],
      duplicate_window: 120_000_000_000,
      ...extra,
    })
  const stored = async () => (await jsm.streams.info('EVENTS')).state.messages
  const publisherOn = (opts: Partial<PublisherOptions> = {}): Publisher =>
    createPublisher(jetstream(nc), {
      clock: new HybridLogicalClock({ node: 'gw-1', maxOffsetMs: 500 }),
      ...opts,
    })
  /** Every copy of a message the server routes, each send of a retried one included. */
  const copiesOf = (subject: string) => {
    const copies = { n: 0 }
    nc.subscribe(subject, {
      callback: () => {
        copies.n++
      },
    })
    return copies
  }

  it('fails each event the stream refuses (max_msg_size) with a PublishError naming it; the rest are stored', async () => {
    // A reading fits (~500 bytes with headers); a status change with a long reason does not.
    await stream({ max_msg_size: 650 })
    const publisher = publisherOn()
    const events: FleetEvent[] = Array.from({ length: 20 }, (_, i) =>
      i % 4 === 3
        ? publisher.stamp({
            type: 'status.changed',
            deviceId: `big-${i}`,
            data: { status: 'maintenance', reason: 'r'.repeat(256) },
          })
        : publisher.stamp(readingDraft(`small-${i}`, i)),
    )
    const results: PublishResult[] = []
    const errors: Error[] = []
    const pipe = new PublishPipeline(
      8,
      (r) => results.push(r),
      (e) => errors.push(e),
    )
    for (const e of events) await pipe.submit(() => publisher.publishEvent(e))
    await pipe.drain()

    expect(results.length).toBe(15)
    expect(errors.length).toBe(5)
    for (const [n, big] of events.filter((e) => e.type === 'status.changed').entries()) {
      const err = errors.find((e) => e.message.includes(big.eventId))
      expect(err, `error ${n} names event ${big.eventId}`).toBeInstanceOf(PublishError)
      expect(err?.message).toMatch(/message size exceeds maximum allowed/)
    }
    expect(await stored()).toBe(15)
    expect(publisher.stats).toEqual({ published: 15, duplicates: 0, failed: 5 })
  })

  it('reports a re-sent event as a duplicate with the sequence of the copy already stored', async () => {
    await stream()
    const publisher = publisherOn()
    const events = Array.from({ length: 50 }, (_, i) => publisher.stamp(readingDraft(`d-${i}`, i)))
    const first = await Promise.all(events.map((e) => publisher.publishEvent(e)))
    const again = await Promise.all(events.map((e) => publisher.publishEvent(e)))

    expect(first.filter((r) => r.duplicate).length).toBe(0)
    expect(again.filter((r) => r.duplicate).length).toBe(50)
    expect(again.map((r) => r.seq)).toEqual(first.map((r) => r.seq))
    expect(await stored()).toBe(50)
    expect(publisher.stats).toEqual({ published: 50, duplicates: 50, failed: 0 })
  })

  it('sends an event whose PubAck is lost again under the same Nats-Msg-Id: the stream stores it once', async () => {
    // A stream that sends no PubAcks loses every one, until it is told to send them again.
    await stream({ no_ack: true })
    const copies = copiesOf('fleet.events.lost-1.reading')
    const publisher = publisherOn({ timeoutMs: 100, maxAttempts: 1000 })
    const publishing = publisher.publish(readingDraft('lost-1', 1))
    await waitFor('the event to be sent three times', () => copies.n >= 3)
    await jsm.streams.update('EVENTS', { no_ack: false })
    const result = await publishing

    expect(await stored()).toBe(1)
    expect(result.seq).toBe(1)
    // The PubAck answers a re-send: the stream already had the event from the first one.
    expect(result.duplicate).toBe(true)
    const m = await jsm.streams.getMessage('EVENTS', { seq: 1 })
    expect(m?.header.get('Nats-Msg-Id')).toBe(result.event.eventId)
  })

  it('fails an event whose PubAcks never come after maxAttempts sends, naming it; stored once', async () => {
    await stream({ no_ack: true })
    const copies = copiesOf('fleet.events.lost-2.reading')
    const publisher = publisherOn({ timeoutMs: 100, maxAttempts: 3 })
    const event = publisher.stamp(readingDraft('lost-2', 1))
    const err = await publisher.publishEvent(event).catch((e: unknown) => e)

    expect(err).toBeInstanceOf(PublishError)
    expect((err as Error).message).toContain(`event '${event.eventId}'`)
    expect((err as Error).message).toMatch(/no PubAck .* in 3 attempts of 100 ms/)
    await nc.flush()
    expect(copies.n).toBe(3)
    expect(await stored()).toBe(1)
    expect(publisher.stats.failed).toBe(1)
  })

  it('never has more than `window` publishes waiting for their PubAck, however many are asked for at once', async () => {
    await stream()
    const publisher = publisherOn({ window: 8 })
    let most = 0
    const publishing: Promise<PublishResult>[] = []
    for (let i = 0; i < 300; i++) {
      publishing.push(
        publisher.publish(readingDraft(`w-${i % 30}`, i)).then((r) => {
          most = Math.max(most, publisher.inFlight)
          return r
        }),
      )
      most = Math.max(most, publisher.inFlight)
    }
    const results = await Promise.all(publishing)

    expect(most).toBe(8)
    expect(publisher.inFlight).toBe(0)
    expect(results.filter((r) => !r.duplicate).length).toBe(300)
    expect(await stored()).toBe(300)
  })
})
