import { JetStreamApiError, type PubAck } from '@nats-io/jetstream'
import { ExponentialBackoff, type IBackoff } from 'cockatiel'
import {
  ClosedConnectionError,
  NoRespondersError,
  nuid,
  PermissionViolationError,
  TimeoutError,
  type Msg,
  type MsgHdrs,
  type NatsConnection,
  type Subscription,
} from '@nats-io/transport-node'

/** How long to wait for a PubAck and how often to send the same message before giving up. */
export interface PipelinedSendOptions {
  /** Time to wait for one PubAck before the message is sent again. */
  readonly timeoutMs: number
  /** Sends per message, counting the first, for lost PubAcks and "no responders". */
  readonly maxAttempts: number
}

/**
 * JetStream publish without a request per message: every message names a reply subject under one
 * wildcard subscription of the connection's inbox prefix, so any number of publishes are in flight
 * at once, their writes are coalesced, and each PubAck is matched by its reply token and checked.
 *
 * A message whose PubAck does not come within `timeoutMs` is sent again, byte for byte with the
 * same headers: the caller must set `Nats-Msg-Id`, which makes the stream store it once however
 * often it is sent. "No responders" (no stream yet, a leader being elected) and JetStream's 503 are
 * sent again after a backoff; any other PubAck error (a message too large, a full stream) fails the
 * message at once with the server's `JetStreamApiError`.
 *
 * ```ts
 * const h = headers(); h.set('Nats-Msg-Id', eventId)
 * const ack = await pipelinedPublish(nc).publish('fleet.events.s-1.reading', body, h,
 *   { timeoutMs: 5000, maxAttempts: 8 })
 * ```
 */
export interface PipelinedPublish {
  publish(
    subject: string,
    payload: Uint8Array,
    headers: MsgHdrs,
    opts: PipelinedSendOptions,
  ): Promise<PubAck>
  /** Messages sent and waiting for their PubAck. */
  readonly inFlight: number
}

/** One per connection: publishers on the same connection share its subscription. */
const byConnection = new WeakMap<NatsConnection, PipelinedPublishImpl>()

export function pipelinedPublish(nc: NatsConnection): PipelinedPublish {
  let p = byConnection.get(nc)
  if (p === undefined) {
    p = new PipelinedPublishImpl(nc)
    byConnection.set(nc, p)
  }
  return p
}

/** The prefix that the connection's role may subscribe to (NATS_INBOX_PREFIX). */
function inboxPrefixOf(nc: NatsConnection): string {
  const options = (nc as { options?: { inboxPrefix?: string } }).options
  return options?.inboxPrefix || '_INBOX'
}

interface Outstanding {
  readonly token: string
  readonly subject: string
  readonly payload: Uint8Array
  readonly headers: MsgHdrs
  readonly reply: string
  readonly opts: PipelinedSendOptions
  attempts: number
  /** The delay before the last re-send (cockatiel's backoff, decorrelated jitter); undefined before one. */
  backoff?: IBackoff<unknown>
  /** When the current attempt times out (epoch ms); Infinity while waiting out a backoff. */
  deadline: number
  resolve(ack: PubAck): void
  reject(err: Error): void
}

/** A PubAck as the server sends it: checked field by field before anyone trusts it. */
interface RawPubAck {
  readonly stream?: unknown
  readonly seq?: unknown
  readonly duplicate?: unknown
  readonly error?: ConstructorParameters<typeof JetStreamApiError>[0]
}

const SWEEP_MS = 50
/** Delays between re-sends of one message. */
const RESEND_BACKOFF = new ExponentialBackoff({ initialDelay: 100, maxDelay: 2000 })

class PipelinedPublishImpl implements PipelinedPublish {
  readonly #nc: NatsConnection
  /** `<inbox prefix>.<nuid>.`: a PubAck's reply subject is this plus the message's token. */
  #replyPrefix = ''
  #sub: Subscription | undefined
  #next = 0
  /** By reply token, in the order sent (a re-send moves to the end). */
  readonly #outstanding = new Map<string, Outstanding>()
  /** Sent on the next turn of the event loop, so that one write carries many messages. */
  #outbox: Outstanding[] = []
  #flushScheduled = false
  #sweeper: ReturnType<typeof setInterval> | undefined
  #watching = false

  constructor(nc: NatsConnection) {
    this.#nc = nc
  }

  get inFlight(): number {
    return this.#outstanding.size
  }

  publish(
    subject: string,
    payload: Uint8Array,
    headers: MsgHdrs,
    opts: PipelinedSendOptions,
  ): Promise<PubAck> {
    if (this.#nc.isClosed()) return Promise.reject(new ClosedConnectionError())
    this.#subscribe()
    const token = (this.#next++).toString(36)
    return new Promise<PubAck>((resolve, reject) => {
      const o: Outstanding = {
        token,
        subject,
        payload,
        headers,
        reply: this.#replyPrefix + token,
        opts,
        attempts: 0,
        deadline: Number.POSITIVE_INFINITY,
        resolve,
        reject,
      }
      this.#outstanding.set(token, o)
      this.#enqueue(o)
      this.#sweeper ??= setInterval(() => {
        this.#sweep()
      }, SWEEP_MS).unref()
    })
  }

  #subscribe(): void {
    if (this.#sub !== undefined && !this.#sub.isClosed()) return
    this.#replyPrefix = `${inboxPrefixOf(this.#nc)}.${nuid.next()}.`
    const tokenAt = this.#replyPrefix.length
    this.#sub = this.#nc.subscribe(`${this.#replyPrefix}*`, {
      callback: (err, msg) => {
        if (err) this.#subscriptionFailed(err)
        else this.#onAck(msg.subject.slice(tokenAt), msg)
      },
    })
    if (!this.#watching) {
      this.#watching = true
      void this.#watch()
    }
  }

  /** Publish permission errors and reconnects concern the messages in flight. */
  async #watch(): Promise<void> {
    void this.#nc.closed().then(() => {
      this.#failAll(new ClosedConnectionError())
    })
    for await (const s of this.#nc.status()) {
      if (s.type === 'error' && s.error instanceof PermissionViolationError) {
        if (s.error.operation === 'publish') this.#refused(s.error)
        else if (s.error.subject === this.#sub?.getSubject()) this.#subscriptionFailed(s.error)
      } else if (s.type === 'reconnect') {
        // What was in flight when the connection dropped may be lost: send it again now.
        for (const o of this.#outstanding.values()) if (o.deadline !== Infinity) this.#enqueue(o)
      }
    }
  }

  #enqueue(o: Outstanding): void {
    this.#outbox.push(o)
    if (!this.#flushScheduled) {
      this.#flushScheduled = true
      setImmediate(() => {
        this.#flush()
      })
    }
  }

  #flush(): void {
    this.#flushScheduled = false
    const batch = this.#outbox
    this.#outbox = []
    const now = Date.now()
    for (const o of batch) {
      const token = o.token
      if (this.#outstanding.get(token) !== o) continue // settled while queued
      o.attempts++
      o.deadline = now + o.opts.timeoutMs
      try {
        this.#nc.publish(o.subject, o.payload, { reply: o.reply, headers: o.headers })
      } catch (err) {
        this.#settle(token, o)
        o.reject(err instanceof Error ? err : new Error(String(err)))
      }
    }
  }

  #onAck(token: string, msg: Msg): void {
    const o = this.#outstanding.get(token)
    if (o === undefined) return // a late PubAck of a message already settled
    if (msg.data.length === 0 && msg.headers?.code === 503) {
      this.#again(token, o, new NoRespondersError(o.subject))
      return
    }
    let ack: RawPubAck
    try {
      ack = msg.json<RawPubAck>()
    } catch (err) {
      this.#settle(token, o)
      o.reject(new Error(`unreadable PubAck for '${o.subject}': ${msg.string()}`, { cause: err }))
      return
    }
    if (ack.error !== undefined) {
      const err = new JetStreamApiError(ack.error)
      if (err.status === 503 || err.code === 10008) this.#again(token, o, err)
      else {
        this.#settle(token, o)
        o.reject(err)
      }
      return
    }
    this.#settle(token, o)
    const { stream, seq, duplicate } = ack
    if (typeof stream !== 'string' || stream === '' || typeof seq !== 'number' || !(seq > 0)) {
      o.reject(new Error(`invalid PubAck for '${o.subject}': ${msg.string()}`))
      return
    }
    o.resolve({ stream, seq, duplicate: duplicate === true })
  }

  /** Sends the message again after a backoff, or fails it when its attempts are used up. */
  #again(token: string, o: Outstanding, err: Error): void {
    if (o.attempts >= o.opts.maxAttempts) {
      this.#settle(token, o)
      o.reject(err)
      return
    }
    o.deadline = Number.POSITIVE_INFINITY
    o.backoff = o.backoff?.next(undefined) ?? RESEND_BACKOFF.next()
    setTimeout(() => {
      if (this.#outstanding.get(token) === o) this.#enqueue(o)
    }, o.backoff.duration)
  }

  /** Sends again what timed out; fails what has no attempts left. */
  #sweep(): void {
    const now = Date.now()
    for (const [token, o] of this.#outstanding) {
      if (o.deadline > now) continue
      if (o.attempts >= o.opts.maxAttempts) {
        this.#settle(token, o)
        o.reject(
          new TimeoutError({
            cause: new Error(
              `no PubAck for '${o.subject}' in ${o.attempts} attempts of ${o.opts.timeoutMs} ms`,
            ),
          }),
        )
      } else {
        o.deadline = Number.POSITIVE_INFINITY // until the flush sends it
        this.#enqueue(o)
      }
    }
  }

  #settle(token: string, _o: Outstanding): void {
    this.#outstanding.delete(token)
    if (this.#outstanding.size === 0 && this.#sweeper !== undefined) {
      clearInterval(this.#sweeper)
      this.#sweeper = undefined
    }
  }

  /** The server refused one publish to this subject: the oldest in flight to it was that one. */
  #refused(err: PermissionViolationError): void {
    for (const [token, o] of this.#outstanding) {
      if (o.subject !== err.subject || o.deadline === Infinity) continue
      this.#settle(token, o)
      o.reject(err)
      return
    }
  }

  #subscriptionFailed(err: Error): void {
    this.#sub = undefined
    this.#failAll(err)
  }

  #failAll(err: Error): void {
    for (const [token, o] of this.#outstanding) {
      this.#settle(token, o)
      o.reject(err)
    }
  }
}
