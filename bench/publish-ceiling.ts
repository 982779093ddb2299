/**
 * (a') the JetStream publish ceiling: what nats-server itself can take in with what ingest sends
 * (fleetstream's headers, `Nats-Msg-Id`, a reply subject per message for its PubAck), from a
 * publisher that costs next to nothing, so that nats-server's own path is what is measured.
 *
 * It speaks the NATS text protocol on a bare socket, on purpose and only here: every frame is
 * encoded before the clock starts, and the client's per-message work while it runs is writing
 * slices of one buffer and framing the PubAcks. nats.js (or any general client) would be the thing
 * measured instead. Every PubAck is read and checked; the stream must have stored them all.
 */
import { connect as tcpConnect, type Socket } from 'node:net'
import type { JetStreamManager } from '@nats-io/jetstream'
import { eventHeaderBytes } from '../infra/publisher.ts'
import { type BenchEvent, BenchError, cpuSeconds } from './common.ts'

const CRLF = Buffer.from('\r\n')
/** Frames per write: fine enough for the window to stay full, coarse enough to cost nothing. */
const SLICE = 128

/** Frames of `SLICE` events each, encoded as ingest would send them. */
function encodeSlices(
  events: readonly BenchEvent[],
  subjectPrefix: string,
  inbox: string,
): Buffer[] {
  const slices: Buffer[] = []
  for (let from = 0; from < events.length; from += SLICE) {
    const parts: Uint8Array[] = []
    for (let i = from; i < Math.min(events.length, from + SLICE); i++) {
      const e = events[i]
      if (e === undefined) continue
      const hdr = eventHeaderBytes(e.event)
      const body = Buffer.from(e.body)
      parts.push(
        Buffer.from(
          `HPUB ${subjectPrefix}${e.subject} ${inbox}${i} ${hdr.length} ${hdr.length + body.length}\r\n`,
        ),
        hdr,
        body,
        CRLF,
      )
    }
    slices.push(Buffer.concat(parts))
  }
  return slices
}

/**
 * The server's side of the protocol as far as this publisher needs it: PubAcks (MSG), PING,
 * errors. Counts PubAcks and throws on one that is not a stored (or duplicate) message.
 */
class AckReader {
  acks = 0
  #buf: Buffer = Buffer.alloc(0)

  constructor(
    private readonly ping: () => void,
    private readonly pong: () => void,
  ) {}

  feed(chunk: Buffer): void {
    this.#buf = this.#buf.length === 0 ? chunk : Buffer.concat([this.#buf, chunk])
    let at = 0
    for (;;) {
      const eol = this.#buf.indexOf(CRLF, at)
      if (eol === -1) break
      const line = this.#buf.toString('latin1', at, eol)
      if (line.startsWith('MSG ')) {
        const size = Number(line.slice(line.lastIndexOf(' ') + 1))
        const end = eol + 2 + size
        if (this.#buf.length < end + 2) break // the payload is still on its way
        const ack = this.#buf.toString('utf8', eol + 2, end)
        if (!ack.includes('"seq":') || ack.includes('"error"')) {
          throw new BenchError(`publish ceiling: the stream refused a message: ${ack}`)
        }
        this.acks++
        at = end + 2
        continue
      }
      if (line.startsWith('HMSG ') || line.startsWith('-ERR')) {
        throw new BenchError(`publish ceiling: nats-server answered '${line}'`)
      }
      if (line === 'PING') this.ping()
      else if (line === 'PONG') this.pong()
      at = eol + 2 // INFO, +OK
    }
    this.#buf = this.#buf.subarray(at)
  }
}

function open(url: string): Promise<Socket> {
  const { hostname, port } = new URL(url)
  return new Promise((resolve, reject) => {
    const s = tcpConnect(Number(port) || 4222, hostname, () => {
      s.off('error', reject)
      resolve(s)
    })
    s.once('error', reject)
    s.setNoDelay(true)
  })
}

export interface CeilingTarget {
  readonly natsUrl: string
  /** nats-server's pid, for its CPU while the clock runs. */
  readonly natsPid: number
  readonly jsm: JetStreamManager
  readonly stream: string
  /** Prepended to each event's subject: the stream's subjects. */
  readonly subjectPrefix: string
}

export interface Ceiling {
  readonly seconds: number
  /** CPU seconds while the clock ran: nats-server's, and this process's (the publisher). */
  readonly natsCpuSeconds: number
  readonly clientCpuSeconds: number
}

/**
 * Publishes every event with about `window` PubAcks outstanding (a slice of `SLICE` is sent whole
 * once fewer than `window` are); resolves when all are acked and the stream holds them.
 */
export async function publishCeiling(
  target: CeilingTarget,
  events: readonly BenchEvent[],
  window: number,
): Promise<Ceiling> {
  const { jsm, stream } = target
  const inbox = '_INBOX.bench-ceiling.'
  const slices = encodeSlices(events, target.subjectPrefix, inbox)
  const storedBefore = (await jsm.streams.info(stream)).state.messages
  const socket = await open(target.natsUrl)
  let natsCpu0 = 0
  let clientCpu0 = 0
  try {
    const seconds = await new Promise<number>((resolve, reject) => {
      let next = 0
      let start = 0
      const pump = (): void => {
        while (next < slices.length && next * SLICE - reader.acks < window) {
          const slice = slices[next++]
          if (slice !== undefined) socket.write(slice)
        }
      }
      const reader = new AckReader(
        () => {
          socket.write('PONG\r\n')
        },
        () => {
          // The handshake's PONG: connected and subscribed; the clock starts.
          if (start !== 0) return
          natsCpu0 = cpuSeconds(target.natsPid)
          clientCpu0 = cpuSeconds(process.pid)
          start = performance.now()
          pump()
        },
      )
      socket.on('error', reject)
      socket.on('close', () => {
        reject(new BenchError('publish ceiling: nats-server closed'))
      })
      socket.on('data', (chunk: Buffer) => {
        try {
          reader.feed(chunk)
        } catch (err) {
          reject(err instanceof Error ? err : new Error(String(err)))
          return
        }
        if (start === 0) return
        if (reader.acks >= events.length) resolve((performance.now() - start) / 1000)
        else pump()
      })
      socket.write(
        'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true,' +
          `"protocol":1,"name":"bench-ceiling"}\r\nSUB ${inbox}* 1\r\nPING\r\n`,
      )
    })
    const natsCpuSeconds = cpuSeconds(target.natsPid) - natsCpu0
    const clientCpuSeconds = cpuSeconds(process.pid) - clientCpu0
    const stored = (await jsm.streams.info(stream)).state.messages - storedBefore
    if (stored !== events.length) {
      throw new BenchError(`publish ceiling: ${stream} stored ${stored} of ${events.length}`)
    }
    return { seconds, natsCpuSeconds, clientCpuSeconds }
  } finally {
    socket.destroy()
  }
}
