/**
 * Reading FLEET_DLQ for people: its depth, every parked event or one, each as a
 * {@link DeadLetterEntry} with the original headers and body decoded (`dlq list`, `dlq show`,
 * the status). Redriving them is processors/dlq/redrive.ts; parking them, processors/dlq/park.ts.
 */
import type { JetStreamManager, StoredMsg } from '@nats-io/jetstream'
import type { Config } from '../../infra/config.ts'
import { OperatorError } from '../../schemas/errors.ts'
import { DLQ_SUBJECT_PREFIX, Headers } from '../../schemas/subjects.ts'
import { entryKey, originalHeaders, unescapeHeaderText } from './park.ts'

/** Where the DLQ is: a JetStream manager and the stream names (a runtime has both). */
export interface DlqStreams {
  readonly jsm: JetStreamManager
  readonly config: Pick<Config, 'streams'>
}

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
export class DlqCommandError extends OperatorError {}

/** DLQ depth, in all and per processor (from the stream's subject counts). */
export async function dlqDepth(
  rt: DlqStreams,
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
export async function listDlq(rt: DlqStreams, processor?: string): Promise<DeadLetterEntry[]> {
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

/** The entry at `seq` in FLEET_DLQ. */
export async function showDlq(rt: DlqStreams, seq: number): Promise<DeadLetterEntry> {
  const m = await getEntry(rt, seq)
  if (m === null)
    throw new DlqCommandError(
      `'seq' must be the sequence of an entry in ${rt.config.streams.dlq}, got ${seq}`,
    )
  return toEntry(m, rt.config.streams.events)
}

/** The DLQ's message at `seq`; null when there is none (never parked, or redriven). */
export async function getEntry(rt: DlqStreams, seq: number): Promise<StoredMsg | null> {
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
