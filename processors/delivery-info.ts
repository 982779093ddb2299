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
/** As nats.js decodes a subject (UTF-8, not fatal). */
const utf8 = new TextDecoder()

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
    this.deliveryCount = tokenNumber(reply, dotCount, 4 + shift)
    this.redelivered = this.deliveryCount > 1
    this.streamSequence = tokenNumber(reply, dotCount, 5 + shift)
    this.deliverySequence = tokenNumber(reply, dotCount, 6 + shift)
    this.timestampNanos = tokenNumber(reply, dotCount, 7 + shift)
    this.pending = tokenNumber(reply, dotCount, 8 + shift)
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
    return utf8.decode(r.subarray(from, to))
  }
}

/** Token `k` (k >= 1) as a number, while {@link dots} holds the `dotCount` dots of `reply`. */
function tokenNumber(reply: Uint8Array, dotCount: number, k: number): number {
  const from = (dots[k - 1] as number) + 1
  const to = k < dotCount ? (dots[k] as number) : reply.length
  if (to - from <= EXACT_DIGITS) {
    const v = digitsAt(reply, from, to)
    if (!Number.isNaN(v)) return v
  } else if (to - from <= EXACT_DIGITS + 9) {
    // A timestamp in nanoseconds has 19 digits: as `high * 1e9 + low`, the nearest double to the
    // decimal (as parseInt gives it) while `high * 1e9` is itself exact: 1e9 is 2^9 * 1953125.
    const high = digitsAt(reply, from, to - 9)
    const low = digitsAt(reply, to - 9, to)
    if (!Number.isNaN(high + low) && high * 1953125 < 2 ** 53) return high * 1e9 + low
  }
  // Anything else as nats.js reads it.
  return parseInt(utf8.decode(reply.subarray(from, to)), 10)
}

/** The digits at [from, to) as a number (exact up to 15 of them); NaN unless all are digits. */
function digitsAt(reply: Uint8Array, from: number, to: number): number {
  if (from >= to) return Number.NaN
  let v = 0
  for (let i = from; i < to; i++) {
    const d = (reply[i] as number) - 48
    if (d < 0 || d > 9) return Number.NaN
    v = v * 10 + d
  }
  return v
}
