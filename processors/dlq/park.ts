/**
 * Parking an event in FLEET_DLQ: the bounded entry (original headers and body, with why), its
 * dedup key, and reading back what a processor parked.
 */
import { createHash } from 'node:crypto'
import type { JetStreamClient, JetStreamManager, JsMsg } from '@nats-io/jetstream'
import { headers as natsHeaders, type MsgHdrs } from '@nats-io/transport-node'
import type { RejectReason } from '../../schemas/decode.ts'
import { DLQ_SUBJECT_PREFIX, Headers } from '../../schemas/subjects.ts'
import { StreamReader } from '../stream-reader.ts'
import { readableHeaders } from '../message-headers.ts'

export interface DeadLetter {
  readonly processor: string
  readonly msg: JsMsg
  readonly reason: RejectReason
  readonly detail: string
  /** How often it was tried before it was parked. */
  readonly attempts: number
}

/** What bounds a DLQ entry: the larger of these it never exceeds. */
export interface DlqLimits {
  /** FLEET_DLQ's `max_msg_size` (and the server's `max_payload`): headers and body together. */
  readonly maxEntryBytes: number
}

/** The DLQ's PubAck, and what was left out of the entry to keep it bounded. */
export interface Parked {
  /** Sequence of the entry in FLEET_DLQ. */
  readonly seq: number
  /** The DLQ already held this entry (a retry, or a re-park after a crash): stored once. */
  readonly duplicate: boolean
  /** What was cut to the budget: `headers`, `body`; empty when the entry is whole. */
  readonly cut: readonly ('headers' | 'body')[]
}

/**
 * Copies a refused event into FLEET_DLQ under `fleet.dlq.<processor>` with why, where from and
 * how often it was delivered, plus its original headers and body, and waits for the PubAck.
 *
 * Bounded whatever the input: the original headers go in as `Fleet-Dlq-Header: <name>: <value>`
 * up to {@link ORIGINAL_HEADERS_BYTES} (`Fleet-Dlq-Headers-Cut` says how many were kept), and the
 * body is cut to what is left of `limits.maxEntryBytes` (`Fleet-Dlq-Body-Cut`); the entry always
 * names the original's stream and sequence, where `dlq show` and a redrive find it whole.
 * `stub: true` leaves out the original headers and body altogether (what the processor falls
 * back to when the server refuses an entry).
 *
 * Idempotent: the DLQ msgID is the processor plus {@link parkedKey}, so a retry, or a re-park
 * after a crash within the DLQ's duplicate window, stores it once. Not the stream sequence: after
 * a stream leader dies, a sequence a processor saw can come back holding another event, and the
 * DLQ's dedup would swallow that one's entry. nats-server 2.9 finds a header by searching the
 * whole header block for its name, so the entry's own `Nats-Msg-Id` comes first and no copied
 * text can read as a header the server obeys ({@link headerText} escapes every `Nats-`).
 */
export async function parkInDlq(
  js: JetStreamClient,
  d: DeadLetter,
  limits: DlqLimits,
  opts: { readonly stub?: boolean } = {},
): Promise<Parked> {
  const entry = deadLetterEntry(d, limits, opts)
  const pa = await js.publish(`${DLQ_SUBJECT_PREFIX}.${d.processor}`, entry.data, {
    headers: entry.headers,
    retries: 5,
  })
  return { seq: pa.seq, duplicate: pa.duplicate, cut: entry.cut }
}

/** The headers and body of the DLQ entry of `d`; see {@link parkInDlq}. */
export function deadLetterEntry(
  d: DeadLetter,
  limits: DlqLimits,
  opts: { readonly stub?: boolean } = {},
): { headers: MsgHdrs; data: Uint8Array; cut: ('headers' | 'body')[] } {
  const { msg } = d
  const key = parkedKey(msg)
  const h = natsHeaders()
  h.set(Headers.MsgId, `${d.processor}:${key}`)
  h.set(Headers.DlqProcessor, headerText(d.processor, 128))
  h.set(Headers.DlqReason, d.reason)
  h.set(Headers.DlqDetail, headerText(d.detail.replace(/[\r\n]+/g, ' '), DETAIL_BYTES))
  h.set(Headers.DlqAttempts, String(d.attempts))
  h.set(Headers.DlqDeliveries, String(msg.info.deliveryCount))
  h.set(Headers.DlqSubject, headerText(msg.subject, SUBJECT_BYTES))
  h.set(Headers.DlqStream, headerText(msg.info.stream, 128))
  h.set(Headers.DlqStreamSeq, String(msg.info.streamSequence))
  h.set(Headers.DlqKey, key)
  const cut: ('headers' | 'body')[] = []
  let total = 0
  let kept = 0
  let used = 0
  // A block nats.js refuses (reason `invalid-headers`) is shown in the detail, not copied.
  const original = readableHeaders(msg)
  for (const name of original?.keys() ?? []) {
    for (const v of original?.values(name) ?? []) {
      total++
      if (opts.stub) continue
      const line = `${headerText(name, NAME_BYTES)}: ${headerText(v, VALUE_BYTES)}`
      const size = Buffer.byteLength(line) + Headers.DlqHeader.length + 4
      if (used + size > ORIGINAL_HEADERS_BYTES) continue
      used += size
      kept++
      h.append(Headers.DlqHeader, line)
    }
  }
  if (kept < total) {
    h.set(Headers.DlqHeadersCut, `kept ${kept} of ${total}`)
    cut.push('headers')
  }
  // Room for the body, after the headers and the note that it was cut.
  const room = limits.maxEntryBytes - headerBytes(h) - 64
  let data = msg.data
  if (opts.stub || data.length > room) {
    data = data.subarray(0, opts.stub ? 0 : Math.max(0, room))
    h.set(Headers.DlqBodyCut, `kept ${data.length} of ${msg.data.length} bytes`)
    cut.push('body')
  }
  return { headers: h, data, cut }
}

/** The original headers of a DLQ entry, as the event carried them (see {@link parkInDlq}). */
export function originalHeaders(h: MsgHdrs): [name: string, value: string][] {
  const out: [string, string][] = []
  for (const line of h.values(Headers.DlqHeader)) {
    const i = line.indexOf(': ')
    if (i < 0) continue
    out.push([unescapeHeaderText(line.slice(0, i)), unescapeHeaderText(line.slice(i + 2))])
  }
  // Entries parked by earlier versions copied the headers as they were, Nats-* ones renamed.
  for (const k of h.keys()) {
    if (k.startsWith(Headers.DlqOriginalPrefix)) {
      for (const v of h.values(k)) out.push([k.slice(Headers.DlqOriginalPrefix.length), v])
    } else if (!k.startsWith('Fleet-Dlq-') && !k.startsWith('Nats-') && !h.has(Headers.DlqKey)) {
      for (const v of h.values(k)) out.push([k, v])
    }
  }
  return out
}

/** The {@link parkedKey} a DLQ entry was parked under (also for entries of earlier versions). */
export function entryKey(h: MsgHdrs, eventsStream: string): string {
  return (
    h.get(Headers.DlqKey) ||
    h.get(`${Headers.DlqOriginalPrefix}${Headers.MsgId}`) ||
    `${eventsStream}:${h.get(Headers.DlqStreamSeq)}`
  )
}

/**
 * Text a device chose, made safe as a header value: `%`, control characters, spaces at either
 * end and the `-` of every `nats-` (any case) are %-escaped, so that the value is one line and
 * no server searching the header block finds `Nats-Msg-Id:`, `Nats-Rollup:`,
 * `Nats-Expected-...:` or any other header it obeys in it. Cut to `maxBytes` with `…`.
 * {@link unescapeHeaderText} reverses it.
 */
export function headerText(s: string, maxBytes: number): string {
  const escaped = s.replace(
    // eslint-disable-next-line no-control-regex -- control characters are what it escapes
    /%|[\x00-\x1f\x7f]|(?<=nats)-|^ | $/gi,
    (c) => `%${c.charCodeAt(0).toString(16).toUpperCase().padStart(2, '0')}`,
  )
  if (Buffer.byteLength(escaped) <= maxBytes) return escaped
  let out = escaped.slice(0, maxBytes)
  while (Buffer.byteLength(out) > maxBytes - 3) out = out.slice(0, -1)
  return `${out.replace(/%[0-9A-F]?$/, '')}…`
}

export function unescapeHeaderText(s: string): string {
  return s.replace(/%([0-9A-F]{2})/g, (_, hex: string) => String.fromCharCode(parseInt(hex, 16)))
}

/**
 * What identifies a parked event: its `Nats-Msg-Id` (the eventId), or stream + sequence for a
 * message stored without one. The DLQ deduplicates on it and a rebuild skips by it. An id that
 * is long or holds other characters than an eventId's (a device chose it) is replaced by its
 * SHA-256, so the key is short and safe as a header value.
 */
export function parkedKey(msg: {
  readonly headers?: MsgHdrs | undefined
  readonly info: { readonly stream: string; readonly streamSequence: number }
}): string {
  const id = readableHeaders(msg)?.get(Headers.MsgId) ?? ''
  if (id === '') return `${msg.info.stream}:${msg.info.streamSequence}`
  if (/^[A-Za-z0-9][A-Za-z0-9_.:@+=-]{0,127}$/.test(id) && !/nats-/i.test(id)) return id
  return `sha256:${createHash('sha256').update(id).digest('hex')}`
}

/** The size of `h` as written on the wire (`NATS/1.0`, one line per value, a blank line). */
function headerBytes(h: MsgHdrs): number {
  let n = 'NATS/1.0\r\n\r\n'.length
  for (const k of h.keys()) for (const v of h.values(k)) n += Buffer.byteLength(`${k}: ${v}\r\n`)
  return n
}

/** Most of the original headers a DLQ entry carries, in bytes as written. */
const ORIGINAL_HEADERS_BYTES = 4096
const DETAIL_BYTES = 1024
const SUBJECT_BYTES = 512
const NAME_BYTES = 128
const VALUE_BYTES = 1024

/**
 * The {@link parkedKey}s of the events `processor` has parked that are still in the DLQ (not
 * redriven), read from the entries' headers. A rebuild skips these, as the live run did.
 * Reads to the end of the processor's DLQ subject as it was when called (entries parked by other
 * processors after it do not hold it up); throws as soon as `signal` aborts.
 */
export async function parkedEvents(
  js: JetStreamClient,
  jsm: JetStreamManager,
  streams: { readonly events: string; readonly dlq: string },
  processor: string,
  signal?: AbortSignal,
): Promise<Set<string>> {
  const subject = `${DLQ_SUBJECT_PREFIX}.${processor}`
  const parked = new Set<string>()
  const info = await jsm.streams.info(streams.dlq, { subjects_filter: subject })
  if ((info.state.subjects?.[subject] ?? 0) === 0) return parked
  const reader = await StreamReader.open(
    js,
    streams.dlq,
    subject,
    { seq: 1 },
    { headersOnly: true },
  )
  try {
    // Entries may be redriven (deleted) meanwhile: stop at the end, however many are left.
    for (;;) {
      signal?.throwIfAborted()
      const m = await reader.next(250)
      if (m === undefined) {
        if (await reader.drained()) break
        continue
      }
      const h = m.headers
      if (h !== undefined && h.get(Headers.DlqStream) === streams.events) {
        parked.add(entryKey(h, streams.events))
      }
      if (reader.pending === 0 && (await reader.drained())) break
    }
  } finally {
    await reader.close()
  }
  return parked
}
