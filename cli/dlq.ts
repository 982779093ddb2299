import type { StoredMsg } from '@nats-io/jetstream'
import { headers as natsHeaders, type MsgHdrs } from '@nats-io/transport-node'
import { errorSummary } from '../infra/retry.ts'
import { sleep } from '../infra/sleep.ts'
import { entryKey, originalHeaders, parkedKey, unescapeHeaderText } from '../processors/dlq/park.ts'
import { DLQ_SUBJECT_PREFIX, Headers, redriveSubject } from '../schemas/subjects.ts'
import type { Runtime } from './runtime.ts'

/** One parked event, as `dlq list` and `dlq show` present it. */
export interface DeadLetterEntry {
  /** Sequence in FLEET_DLQ. */
  readonly seq: number
  readonly processor: string
  readonly reason: string
  readonly detail: string
  readonly attempts: number
  readonly deliveries: number
  /** Where the event came from. */
  readonly subject: string
  readonly stream: string
  readonly streamSeq: number
  readonly parkedAt: string
  /** What identifies the event: its eventId, or `<stream>:<seq>`. */
  readonly key: string
  /** The original headers as the event carried them (repeated ones joined with `, `). */
  readonly headers: Record<string, string>
  /** Set when the entry holds only some of the original headers: `kept <n> of <total>`. */
  readonly headersCut?: string
  /**
   * The body: decoded JSON when it parses and is nested at most {@link MAX_BODY_DEPTH} levels
   * deep, the raw text otherwise.
   */
  readonly body: unknown
  /** Set when the body is shown as text although it is JSON, and why. */
  readonly bodyNote?: string
  /** Set when the entry holds only the start of the body: `kept <n> of <total> bytes`. */
  readonly bodyCut?: string
}

/** Deeper JSON bodies are shown as text: printing them would exhaust the stack. */
export const MAX_BODY_DEPTH = 100

/** An operator error: no such entry, nothing selected. */
export class DlqCommandError extends Error {
  override readonly name = 'DlqCommandError'
}

/** DLQ depth, in all and per processor (from the stream's subject counts). */
export async function dlqDepth(
  rt: Pick<Runtime, 'jsm' | 'config'>,
): Promise<{ total: number; byProcessor: Record<string, number> }> {
  const info = await rt.jsm.streams.info(rt.config.streams.dlq, {
    subjects_filter: `${DLQ_SUBJECT_PREFIX}.>`,
  })
  const byProcessor: Record<string, number> = {}
  for (const [subject, n] of Object.entries(info.state.subjects ?? {})) {
    byProcessor[subject.slice(DLQ_SUBJECT_PREFIX.length + 1)] = n
  }
  return { total: info.state.messages, byProcessor }
}

/** Every parked event (optionally of one processor), oldest first. */
export async function listDlq(rt: Runtime, processor?: string): Promise<DeadLetterEntry[]> {
  const info = await rt.jsm.streams.info(rt.config.streams.dlq)
  const out: DeadLetterEntry[] = []
  if (info.state.messages === 0) return out
  for (let seq = info.state.first_seq; seq <= info.state.last_seq; seq++) {
    const m = await getEntry(rt, seq)
    if (m === null) continue // removed by a redrive
    const entry = toEntry(m, rt.config.streams.events)
    if (processor === undefined || entry.processor === processor) out.push(entry)
  }
  return out
}

export async function showDlq(rt: Runtime, seq: number): Promise<DeadLetterEntry> {
  const m = await getEntry(rt, seq)
  if (m === null)
    throw new DlqCommandError(
      `'seq' must be the sequence of an entry in ${rt.config.streams.dlq}, got ${seq}`,
    )
  return toEntry(m, rt.config.streams.events)
}

export interface RedriveOptions {
  /** Entries to redrive; all of them (of `processor`, if given) when omitted. */
  readonly seqs?: readonly number[]
  readonly processor?: string
  /** At most this many events per second, so a redrive never floods a processor. */
  readonly ratePerSecond: number
  readonly signal?: AbortSignal
  /** Called once the entries are selected and after each one, with how far it got. */
  readonly onProgress?: (p: {
    handled: number
    done: number
    failed: number
    total: number
  }) => void
}

/** What a redrive did: the entries put back, and those that could not be, with why. */
export interface RedriveResult {
  readonly done: DeadLetterEntry[]
  readonly failed: { readonly entry: DeadLetterEntry; readonly error: string }[]
}

/**
 * Puts parked events back into FLEET_EVENTS for the processor that parked them, on
 * `<original subject>.redrive.<processor>` ({@link redriveSubject}): only an operator may publish
 * there, every processor's consumer receives it, and only the one it names applies it (the
 * others applied the original). The copy carries the original body and headers, except any
 * header that names or mentions a `Nats-*` header (the server would act on it, e.g. a
 * device-chosen `Nats-Expected-Last-Msg-Id`) and any `Fleet-Redrive-*` one. An entry cut to the
 * DLQ's budget is put back from the original in FLEET_EVENTS, found by its sequence.
 *
 * The copy's `Nats-Msg-Id` is `redrive:<processor>:<dlq seq>`, so JetStream's dedup never
 * swallows it, and a redrive repeated after a crash stores it once. The DLQ entry is deleted
 * once the copy is stored. An entry that fails is reported and left in the DLQ; the rest go on.
 */
export async function redriveDlq(rt: Runtime, o: RedriveOptions): Promise<RedriveResult> {
  const selected =
    o.seqs === undefined
      ? await listDlq(rt, o.processor)
      : await Promise.all(o.seqs.map((s) => showDlq(rt, s)))
  const gap = 1000 / o.ratePerSecond
  const result: RedriveResult = { done: [], failed: [] }
  let next = Date.now()
  let handled = 0
  const report = () =>
    o.onProgress?.({
      handled,
      done: result.done.length,
      failed: result.failed.length,
      total: selected.length,
    })
  report()
  for (const e of selected) {
    if (o.signal?.aborted) break
    await sleep(next - Date.now(), o.signal ?? new AbortController().signal)
    next = Math.max(next + gap, Date.now())
    try {
      if (await redriveOne(rt, e)) result.done.push(e)
    } catch (err) {
      result.failed.push({ entry: e, error: errorSummary(err) })
    }
    handled++
    report()
  }
  return result
}

/** Puts one entry back; `false` when it was redriven meanwhile. */
async function redriveOne(rt: Runtime, e: DeadLetterEntry): Promise<boolean> {
  const m = await getEntry(rt, e.seq)
  if (m === null) return false
  let subject = e.subject
  let data = m.data
  let headers = originalHeaders(m.header)
  if (m.header.has(Headers.DlqHeadersCut) || m.header.has(Headers.DlqBodyCut)) {
    const original = await rt.jsm.streams.getMessage(e.stream, { seq: e.streamSeq })
    if (original === null) {
      throw new DlqCommandError(
        `entry ${e.seq} is cut and its original, ${e.stream} #${e.streamSeq}, is gone`,
      )
    }
    const found = parkedKey({
      headers: original.header,
      info: { stream: e.stream, streamSequence: e.streamSeq },
    })
    if (found !== e.key) {
      throw new DlqCommandError(
        `entry ${e.seq}: ${e.stream} #${e.streamSeq} must hold the parked event '${e.key}' (the entry is cut), got '${found}'`,
      )
    }
    subject = original.subject
    data = original.data
    headers = [...pairs(original.header)]
  }
  // First: nats-server 2.9 takes the first `Nats-Msg-Id:` in the header block.
  const h = natsHeaders()
  h.set(Headers.MsgId, `redrive:${e.processor}:${e.seq}`)
  for (const [k, v] of headers) {
    if (/nats-/i.test(k) || /nats-/i.test(v) || /^fleet-redrive-/i.test(k)) continue
    h.append(k, v)
  }
  h.set(Headers.RedriveOf, String(e.streamSeq))
  await rt.js.publish(redriveSubject(subject, e.processor), data, { headers: h })
  await rt.jsm.streams.deleteMessage(rt.config.streams.dlq, e.seq, false)
  return true
}

function* pairs(h: MsgHdrs | undefined): Generator<[string, string]> {
  for (const k of h?.keys() ?? []) for (const v of h?.values(k) ?? []) yield [k, v]
}

async function getEntry(rt: Runtime, seq: number): Promise<StoredMsg | null> {
  try {
    return await rt.jsm.streams.getMessage(rt.config.streams.dlq, { seq })
  } catch (err) {
    if ((err as { code?: unknown }).code === 10037) return null // no message found
    throw err
  }
}

function toEntry(m: StoredMsg, eventsStream: string): DeadLetterEntry {
  const h = (k: string) => m.header.get(k)
  const original: Record<string, string> = {}
  for (const [k, v] of originalHeaders(m.header)) {
    original[k] = original[k] === undefined ? v : `${original[k]}, ${v}`
  }
  const text = new TextDecoder().decode(m.data)
  const shown = showBody(text)
  const headersCut = h(Headers.DlqHeadersCut)
  const bodyCut = h(Headers.DlqBodyCut)
  return {
    seq: m.seq,
    processor: unescapeHeaderText(h(Headers.DlqProcessor)),
    reason: h(Headers.DlqReason),
    detail: unescapeHeaderText(h(Headers.DlqDetail)),
    attempts: Number(h(Headers.DlqAttempts) || '1'),
    deliveries: Number(h(Headers.DlqDeliveries) || '1'),
    subject: unescapeHeaderText(h(Headers.DlqSubject)),
    stream: unescapeHeaderText(h(Headers.DlqStream)),
    streamSeq: Number(h(Headers.DlqStreamSeq)),
    parkedAt: m.time.toISOString(),
    key: entryKey(m.header, eventsStream),
    headers: original,
    ...(headersCut ? { headersCut } : {}),
    ...shown,
    ...(bodyCut ? { bodyCut } : {}),
  }
}

/**
 * The body as JSON when it parses and is nested at most {@link MAX_BODY_DEPTH} levels deep (so
 * that printing it cannot exhaust the stack), as text otherwise.
 */
function showBody(text: string): { body: unknown; bodyNote?: string } {
  if (jsonDepth(text) > MAX_BODY_DEPTH) {
    return { body: text, bodyNote: `nested deeper than ${MAX_BODY_DEPTH} levels: shown as text` }
  }
  try {
    return { body: JSON.parse(text) as unknown }
  } catch {
    return { body: text } // shown as it is: bad JSON is a reason things get parked
  }
}

/** How deep `[` and `{` nest in `text`, outside strings; counted in one pass, no recursion. */
export function jsonDepth(text: string): number {
  let depth = 0
  let max = 0
  let inString = false
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i)
    if (inString) {
      if (c === 0x5c)
        i++ // backslash: skip the escaped character
      else if (c === 0x22) inString = false
    } else if (c === 0x22) inString = true
    else if (c === 0x5b || c === 0x7b) max = Math.max(max, ++depth)
    else if (c === 0x5d || c === 0x7d) depth--
  }
  return max
}
