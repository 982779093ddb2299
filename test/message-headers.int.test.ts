import { jetstream, jetstreamManager, type JsMsg } from '@nats-io/jetstream'
import { connect, type NatsConnection } from '@nats-io/transport-node'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { HeaderBlockError, headersOf } from '../processors/message-headers.ts'
import { startNatsServer, type NatsServer } from './harness/test-servers.ts'
import { publishRaw } from './fixtures.ts'

const outcome = (read: () => string | undefined): { value?: string; error?: string } => {
  try {
    return { value: read() }
  } catch (err) {
    return { error: (err as Error).message }
  }
}

const NAMES = ['Nats-Msg-Id', 'Fleet-Hlc', 'Fleet-Missing'] as const

describe('headersOf', () => {
  let nats: NatsServer
  let nc: NatsConnection
  let msgs: JsMsg[]
  beforeAll(async () => {
    nats = await startNatsServer()
    nc = await connect({ servers: nats.url })
    const jsm = await jetstreamManager(nc)
    await jsm.streams.add({ name: 'H', subjects: ['h.>'] })
    await publishRaw(nats.url, [
      { subject: 'h.plain', header: 'NATS/1.0\r\nNats-Msg-Id: a-1\r\nFleet-Hlc: 17-0-x\r\n\r\n' },
      { subject: 'h.none' },
      {
        subject: 'h.twice',
        header: 'NATS/1.0\r\nFleet-Hlc:  first \t\r\nFleet-Hlc: second\r\n\r\n',
      },
      { subject: 'h.case', header: 'NATS/1.0\r\nnats-msg-id: a-2\r\nFleet-Hlc:\r\n\r\n' },
      { subject: 'h.colons', header: 'NATS/1.0\r\nno colon here\r\nFleet-Hlc: a:b:c\r\n\r\n' },
      { subject: 'h.status', header: 'NATS/1.0 100 Idle\r\nFleet-Hlc: 1\r\n\r\n' },
      { subject: 'h.unicode', header: 'NATS/1.0\r\nFleet-Hlc: café\r\n\r\n' },
      { subject: 'h.spaced-name', header: 'NATS/1.0\r\n Fleet-Hlc: 2\r\n\r\n' },
      { subject: 'h.lone-lf', header: 'NATS/1.0\r\nFleet-Hlc: 3\nFleet-Other: 4\r\n\r\n' },
      { subject: 'h.lone-cr', header: 'NATS/1.0\r\nFleet-X\r: 5\r\nFleet-Hlc: 6\r\n\r\n' },
    ])
    const consumer = await jetstream(nc).consumers.get('H')
    msgs = []
    const it = await consumer.fetch({ max_messages: 10, expires: 5000 })
    for await (const m of it) msgs.push(m)
  })
  afterAll(async () => {
    await nc.close()
    await nats.cleanup()
  })

  it('reads what msg.headers.get reads, or refuses what it throws on, for every header block', () => {
    expect(msgs.map((m) => m.subject)).toHaveLength(10)
    for (const m of msgs) {
      for (const name of NAMES) {
        const ours = outcome(() => {
          try {
            return headersOf(m)?.get(name)
          } catch (err) {
            // What nats.js refused, named for the DLQ; its own error is the cause.
            expect(err).toBeInstanceOf(HeaderBlockError)
            throw (err as Error).cause
          }
        })
        expect(ours, `${m.subject} ${name}`).toEqual(outcome(() => m.headers?.get(name)))
      }
    }
  })

  it('a refused block is named with its start, its CRs and LFs visible', () => {
    const refused = msgs.filter((m) => outcome(() => m.headers?.get('Fleet-Hlc')).error)
    expect(refused.length).toBeGreaterThan(0)
    for (const m of refused) {
      const err = outcome(() => headersOf(m)?.get('Fleet-Hlc')).error ?? ''
      expect(err, m.subject).toContain('the NATS client refused the block')
      expect(err, m.subject).toContain('; the block starts "NATS/1.0\\r\\n')
    }
  })

  it("reads a plain block without building nats.js's header map", () => {
    const plain = msgs.find((m) => m.subject === 'h.plain') as JsMsg
    const core = (plain as unknown as { msg: { _headers?: unknown } }).msg
    core._headers = undefined
    const headers = headersOf(plain)
    expect(headers?.get('Nats-Msg-Id')).toBe('a-1')
    expect(headers?.get('Fleet-Hlc')).toBe('17-0-x')
    // nats.js 3 keeps the raw block where headerOf reads it; a client upgrade that moves it
    // falls back to msg.headers (still exact) and fails here, so the fast path is not lost unseen.
    expect(core._headers).toBeUndefined()
  })
})
