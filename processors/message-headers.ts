/**
 * The headers of a delivered message, read straight from its raw header block. `msg.headers` of
 * nats.js builds the whole header map on first use (each header name canonicalised and looked
 * up again in a fresh key list): ~6% of a processor's CPU when `decide()` reads two headers of
 * every message. Looking up only the lines asked for gives the same values, or defers to nats.js
 * whenever the block holds anything its decoder would treat differently.
 */
import type { JsMsg } from '@nats-io/jetstream'
import type { MsgHdrs } from '@nats-io/transport-node'
import { BadInputError } from '../schemas/errors.ts'

/** What `decide()` asks of a message's headers: `get` as nats.js's `MsgHdrs.get`. */
export interface HeaderReader {
  /** The first value of header `name` (exact name, trimmed); `''` when absent. */
  get(name: string): string
}

/**
 * A header block nats.js refuses to decode: a device published it raw (HPUB), with a header name
 * holding a space, a control or non-ASCII character, or a value holding a lone CR or LF. The
 * server stores it as sent; the message is refused and parked like any other bad input.
 */
export class HeaderBlockError extends BadInputError {}

/**
 * The headers of `msg`, read from its raw header block when nats.js would read the block the same
 * way (else `msg.headers` itself); `undefined` when the message has none. Decoded and checked
 * once, however many headers are read. Throws {@link HeaderBlockError} when nats.js refuses the
 * block.
 *
 * ```ts
 * headersOf(msg)?.get('Nats-Msg-Id') // '0193...' ('' when absent), as msg.headers?.get(...)
 * ```
 */
export function headersOf(msg: JsMsg): HeaderReader | undefined {
  const text = rawHeaderText(msg)
  if (text === null) return natsHeadersOf(msg)
  if (text === undefined) return undefined
  // Non-ASCII, a lone CR or LF, or a line whose name nats.js would refuse (it throws): its
  // decoder, not this one, says what the message holds.
  if (!PLAIN_BLOCK.test(text)) return natsHeadersOf(msg)
  return new PlainHeaders(text)
}

/**
 * `msg.headers`, or {@link HeaderBlockError} naming what nats.js refused and showing the start of
 * the block (JSON-escaped, so CRs, LFs and control characters are visible).
 */
function natsHeadersOf(msg: JsMsg): MsgHdrs | undefined {
  try {
    return msg.headers
  } catch (err) {
    const core = natsCore(msg)
    const shown =
      core === undefined || core._msg.hdr <= -1
        ? ''
        : `; the block starts ${JSON.stringify(utf8.decode(core._rdata.subarray(0, Math.min(core._msg.hdr, SHOWN_BYTES))))}`
    throw new HeaderBlockError(
      `headers: a header name must be visible ASCII without ':' and a value one line; ` +
        `the NATS client refused the block: ${err instanceof Error ? err.message : String(err)}${shown}`,
      { cause: err },
    )
  }
}

/**
 * The headers of a message for writing it down (a DLQ entry, a span, a log line): `msg.headers`,
 * or `undefined` when nats.js refuses its block (see {@link HeaderBlockError}), so that a device's
 * bytes never make recording them fail.
 */
export function readableHeaders(msg: {
  readonly headers?: MsgHdrs | undefined
}): MsgHdrs | undefined {
  try {
    return msg.headers
  } catch {
    return undefined
  }
}

/** How much of a refused header block its error shows. */
const SHOWN_BYTES = 200

/** What {@link PlainHeaders.get} looks for, per header name: not a new string per look-up. */
const NEEDLES = new Map<string, string>()

/** A plain header block ({@link PLAIN_BLOCK}) as text. */
class PlainHeaders implements HeaderReader {
  readonly #text: string

  constructor(text: string) {
    this.#text = text
  }

  get(name: string): string {
    const text = this.#text
    // A CRLF starts a line only: the block has no other CR or LF.
    let needle = NEEDLES.get(name)
    if (needle === undefined) NEEDLES.set(name, (needle = `\r\n${name}:`))
    const at = text.indexOf(needle)
    if (at < 0) return ''
    const from = at + 2 + name.length + 1
    const end = text.indexOf('\r\n', from)
    return text.slice(from, end < 0 ? text.length : end).trim()
  }
}

/**
 * Every line a plain block: printable ASCII (tabs too) separated by CRLF, each line after the
 * first (the status line) empty, without a colon (nats.js skips it), or a name of visible
 * characters and a colon. Anything else is left to nats.js.
 */
const PLAIN_BLOCK = /^[\t\x20-\x7e]*(?:\r\n(?:[\x21-\x39\x3b-\x7e]*:[\t\x20-\x7e]*|[^:\r\n]*))*$/

/** The bytes nats.js decodes its header block from (`TextDecoder` without `fatal`). */
const utf8 = new TextDecoder()

/**
 * The raw header block of a message delivered by nats.js 3 (`JsMsgImpl.msg`, a `MsgImpl`) as
 * text, read as Latin-1: `undefined` when it has none, `null` when the message is not of that
 * shape (another client version or a test double), so the caller asks `msg.headers` instead. A
 * plain block is ASCII, and any byte past ASCII fails {@link PLAIN_BLOCK} as it would once decoded
 * as UTF-8 (it then goes to nats.js). Straight from the buffer where it is one: no view per message.
 */
function rawHeaderText(msg: JsMsg): string | undefined | null {
  const core = natsCore(msg)
  if (core === undefined) return null
  const {
    _rdata: data,
    _msg: { hdr },
  } = core
  if (hdr <= -1) return undefined
  return Buffer.isBuffer(data)
    ? data.toString('latin1', 0, hdr)
    : latin1.decode(data.subarray(0, hdr))
}

const latin1 = new TextDecoder('latin1')

/**
 * The `MsgImpl` of nats.js 3 inside a delivered message: its raw bytes (the header block, then
 * the payload) and where the header block ends (-1: none); `undefined` for any other shape.
 */
function natsCore(msg: JsMsg): { _rdata: Uint8Array; _msg: { hdr: number } } | undefined {
  const core = (msg as { msg?: { _rdata?: unknown; _msg?: { hdr?: unknown } } }).msg
  if (!(core?._rdata instanceof Uint8Array) || typeof core._msg?.hdr !== 'number') return undefined
  return core as { _rdata: Uint8Array; _msg: { hdr: number } }
}
