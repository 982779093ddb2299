import { createRequire } from 'node:module'
import {
  AckPolicy,
  jetstream,
  jetstreamManager,
  type DeliveryInfo,
  type JsMsg,
} from '@nats-io/jetstream'
import { connect, type NatsConnection } from '@nats-io/transport-node'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { deliveryInfoOf, primeDeliveryInfo } from '../processors/delivery-info.ts'
import { startNatsServer, type NatsServer } from './harness/test-servers.ts'

// nats.js's own parse, the reference (not exported: its package's export map hides lib/).
const jsmsg = createRequire(import.meta.url)('../node_modules/@nats-io/jetstream/lib/jsmsg.js') as {
  parseInfo: (s: string) => DeliveryInfo
}
const parseInfo = (s: string) => jsmsg.parseInfo(s)

const FIELDS = [
  'domain',
  'account_hash',
  'stream',
  'consumer',
  'deliveryCount',
  'redelivered',
  'streamSequence',
  'deliverySequence',
  'timestampNanos',
  'pending',
] as const

const fields = (i: DeliveryInfo) => Object.fromEntries(FIELDS.map((f) => [f, i[f]]))
const bytes = (s: string) => new TextEncoder().encode(s)

describe('deliveryInfoOf', () => {
  it('reads what nats.js parseInfo reads, in the old and the new layout', () => {
    const subjects = [
      '$JS.ACK.FLEET_EVENTS.processor-alerts.1.1.1.1733340000123456789.0',
      '$JS.ACK.S.c.3.9007199254740991.42.1733340000123456789.999999',
      '$JS.ACK.hub.ACCHASH.FLEET_EVENTS.readings.2.17.5.1733340000000000001.3.r4nd0m',
      '$JS.ACK._.ACCHASH.S.c.1.12345678901234567.7.1.0.xyz',
      '$JS.ACK.hub.H.S.c.1.2.3.4.5',
      '$JS.ACK.S.c.1x.02.3.4.-5', // not the server's, but read as nats.js reads it
      '$JS.ACK.Strömung.verbraucher.1.2.3.4.5',
    ]
    for (const s of subjects) {
      const ours = deliveryInfoOf(bytes(s))
      expect(ours, s).toBeDefined()
      expect(fields(ours as DeliveryInfo), s).toEqual(fields(parseInfo(s)))
    }
  })

  it('reads a nanosecond timestamp as the same double as parseInt, digit for digit', () => {
    const digits = (n: number) =>
      Array.from(
        { length: n },
        (_, i) => (i === 0 ? 1 : 0) + Math.floor(Math.random() * (i === 0 ? 9 : 10)),
      ).join('')
    const stamps = [
      '1733340000123456789',
      '9007199254740993000', // past where high * 1e9 is exact: read as nats.js reads it
      '99999999999999999999',
      '0000000000000000001',
      ...Array.from({ length: 2000 }, () => digits(16 + Math.floor(Math.random() * 4))),
    ]
    for (const t of stamps) {
      const s = `$JS.ACK.S.c.1.2.3.${t}.0`
      expect(deliveryInfoOf(bytes(s))?.timestampNanos, t).toBe(parseInfo(s).timestampNanos)
    }
  })

  it('reads nothing from a subject nats.js refuses, and leaves it to nats.js', () => {
    for (const s of [
      '',
      '$JS.ACK',
      '$JS.NAK.S.c.1.1.1.1.0',
      '_INBOX.abc.def',
      '$JS.ACK.S.c.1.1.1',
    ]) {
      expect(deliveryInfoOf(bytes(s)), s).toBeUndefined()
      expect(() => parseInfo(s), s).toThrow()
    }
  })
})

describe('primeDeliveryInfo', () => {
  let nats: NatsServer
  let nc: NatsConnection
  let msgs: JsMsg[]
  beforeAll(async () => {
    nats = await startNatsServer()
    nc = await connect({ servers: nats.url })
    const jsm = await jetstreamManager(nc)
    await jsm.streams.add({ name: 'D', subjects: ['d.>'] })
    await jsm.consumers.add('D', { durable_name: 'reader', ack_policy: AckPolicy.Explicit })
    const js = jetstream(nc)
    for (let i = 0; i < 5; i++) await js.publish(`d.${i}`, `m${i}`)
    const consumer = await js.consumers.get('D', 'reader')
    msgs = []
    const first = await consumer.fetch({ max_messages: 5, expires: 5000 })
    for await (const m of first) msgs.push(m)
    // Delivered again (nak): a delivery count of 2, and the pending count moved.
    msgs[1]?.nak()
    const again = await consumer.next({ expires: 5000 })
    if (again !== null) msgs.push(again)
  })
  afterAll(async () => {
    await nc.close()
    await nats.cleanup()
  })

  it('gives a delivered message the info nats.js would parse from its ack subject', () => {
    expect(msgs).toHaveLength(6)
    for (const m of msgs) {
      const reference = fields(parseInfo((m as unknown as { reply: string }).reply))
      primeDeliveryInfo(m)
      // Kept by nats.js: read from the bytes, not parsed again from the string.
      expect(Object.getPrototypeOf(m.info)).not.toBe(Object.prototype)
      expect(fields(m.info)).toEqual(reference)
    }
    expect(msgs.map((m) => m.info.streamSequence)).toEqual([1, 2, 3, 4, 5, 2])
    expect(msgs[5]?.info.deliveryCount).toBe(2)
    expect(msgs[5]?.info.redelivered).toBe(true)
  })
})
