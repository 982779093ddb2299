/**
 * A delivered message's `info` (stream and delivery sequences, time, pending), read from the raw
 * bytes of its ack subject. nats.js parses it on first use by decoding the reply subject to a
 * string, splitting it on dots and splicing the old layout into the new: ~0.9 KB of garbage per
 * message in every processor (a heap profile: `split`, `splice` and the info object were ~10% of
 * what the readings processor allocated), most of it for the one in a thousand messages that is
 * acked. This reads the numbers straight from the bytes; the names (stream, consumer, domain,
 * account) are decoded only when asked for.
 */
import type { DeliveryInfo, JsMsg } from '@nats-io/jetstream'

/** `$JS.ACK.` */
const PREFIX = [36, 74, 83, 46, 65, 67, 75, 46]
const DOT = 46
/** Digits of a number that a double holds exactly whatever they are (2^53 has 16). */
const EXACT_DIGITS = 15
/** Where the dots are: reused, so a parse allocates nothing for them. */
const dots = new Int32Array(12)
const latin1 = new TextDecoder('latin1')

/**
 * The delivery info of an ack subject (`$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.
 * <delivery seq>.<nanos>.<pending>`, or with `<domain>.<account hash>.` after `$JS.ACK.` and a
 * random token at the end), as nats.js's `parseInfo` gives it; `undefined` when the bytes are not
 * one, and nats.js is left to say so.
 */
export function deliveryInfoOf(reply: Uint8Array): DeliveryInfo | undefined {
  if (reply.length < PREFIX.length) return undefined
  for (let i = 0; i < PREFIX.length; i++) if (reply[i] !== PREFIX[i]) return undefined
  let n = 0
  for (let i = 0; i < reply.length; i++) {
    if (reply[i] !== DOT) continue
    if (n === dots.length) return undefined
    dots[n++] = i
  }
  // Tokens are dots + 1: 9 in the old layout, 11 or more (12 today) in the new one.
  if (n === 8) return new WireDeliveryInfo(reply, n, 0)
  if (n >= 10) return new WireDeliveryInfo(reply, n, 2)
  return undefined
}

/**
 * Gives `msg` the info read from its ack subject's bytes before anything asks for `msg.info`, when
 * it is a message of nats.js 3 (`JsMsgImpl`, whose `info` getter keeps what it finds in `di`);
 * any other shape is left to nats.js.
 */
export function primeDeliveryInfo(msg: JsMsg): void {
  const impl = msg as unknown as { di?: unknown; msg?: { _msg?: { reply?: unknown } } }
  if (impl.di !== undefined || !('di' in impl)) return
  const reply = impl.msg?._msg?.reply
  if (!(reply instanceof Uint8Array)) return
  const info = deliveryInfoOf(reply)
  if (info !== undefined) impl.di = info
}

class WireDeliveryInfo implements DeliveryInfo {
  readonly deliveryCount: number
  readonly redelivered: boolean
  readonly streamSequence: number
  readonly deliverySequence: number
  readonly timestampNanos: number
  readonly pending: number
  readonly #reply: Uint8Array
  /** 2 in the new layout (domain and account hash before the stream), else 0. */
  readonly #shift: number

  /** Reads the numbers while {@link dots} holds the `dotCount` dots of `reply`. */
  constructor(reply: Uint8Array, dotCount: number, shift: 0 | 2) {
    this.#reply = reply
    this.#shift = shift
    const num = (k: number) =>
      numberAt(
        reply,
        (dots[k - 1] as number) + 1,
        k < dotCount ? (dots[k] as number) : reply.length,
      )
    this.deliveryCount = num(4 + shift)
    this.redelivered = this.deliveryCount > 1
    this.streamSequence = num(5 + shift)
    this.deliverySequence = num(6 + shift)
    this.timestampNanos = num(7 + shift)
    this.pending = num(8 + shift)
  }

  get stream(): string {
    return this.#token(2 + this.#shift)
  }

  get consumer(): string {
    return this.#token(3 + this.#shift)
  }

  get domain(): string {
    // nats.js: none in the old layout, and `_` is none.
    const d = this.#shift === 0 ? '' : this.#token(2)
    return d === '_' ? '' : d
  }

  get account_hash(): string {
    // nats.js: empty in the old layout.
    return this.#shift === 0 ? '' : this.#token(3)
  }

  /** Token `k` (token 0 is `$JS`), found again: names are rarely asked for. */
  #token(k: number): string {
    const r = this.#reply
    let from = 0
    for (let seen = 0; seen < k; from++) if (r[from] === DOT) seen++
    let to = from
    while (to < r.length && r[to] !== DOT) to++
    return latin1.decode(r.subarray(from, to))
  }
}

/** The decimal at [from, to), as `parseInt(token, 10)` reads the server's digits. */
function numberAt(reply: Uint8Array, from: number, to: number): number {
  if (to - from > EXACT_DIGITS) return parseInt(latin1.decode(reply.subarray(from, to)), 10)
  let v = 0
  let i = from
  for (; i < to; i++) {
    const d = (reply[i] as number) - 48
    if (d < 0 || d > 9) break
    v = v * 10 + d
  }
  return i === from ? Number.NaN : v
}
