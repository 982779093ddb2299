import type { StoredMsg } from '@nats-io/jetstream'
import { headers as natsHeaders } from '@nats-io/transport-node'
import { sleep } from '../infra/sleep.ts'
import { DLQ_SUBJECT_PREFIX, Headers } from '../schemas/subjects.ts'
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
  /** The original headers (Nats-* ones under their own names again). */
  readonly headers: Record<string, string>
  /** The body: decoded JSON when it parses, the raw text otherwise. */
  readonly body: unknown
}

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
    const entry = toEntry(m)
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
  return toEntry(m)
}

export interface RedriveOptions {
  /** Entries to redrive; all of them (of `processor`, if given) when omitted. */
  readonly seqs?: readonly number[]
  readonly processor?: string
  /** At most this many events per second, so a redrive never floods a processor. */
  readonly ratePerSecond: number
  readonly signal?: AbortSignal
}

/**
 * Puts parked events back into FLEET_EVENTS, under their original subject and headers, for the
 * processor that parked them: `Fleet-Redrive-For` names it and every other processor acks the
 * copy without applying it (they applied the original). The copy's `Nats-Msg-Id` is
 * `redrive:<processor>:<dlq seq>`, so JetStream's dedup never swallows it, and a redrive repeated
 * after a crash stores it once. The DLQ entry is deleted once the copy is stored.
 */
export async function redriveDlq(rt: Runtime, o: RedriveOptions): Promise<DeadLetterEntry[]> {
  const selected =
    o.seqs === undefined
      ? await listDlq(rt, o.processor)
      : await Promise.all(o.seqs.map((s) => showDlq(rt, s)))
  const gap = 1000 / o.ratePerSecond
  const done: DeadLetterEntry[] = []
  let next = Date.now()
  for (const e of selected) {
    if (o.signal?.aborted) break
    await sleep(next - Date.now(), o.signal ?? new AbortController().signal)
    next = Math.max(next + gap, Date.now())
    const m = await getEntry(rt, e.seq)
    if (m === null) continue // redriven meanwhile
    const h = natsHeaders()
    for (const [k, v] of Object.entries(e.headers)) if (k !== Headers.MsgId) h.set(k, v)
    h.set(Headers.RedriveFor, e.processor)
    h.set(Headers.RedriveOf, String(e.streamSeq))
    await rt.js.publish(e.subject, m.data, { msgID: `redrive:${e.processor}:${e.seq}`, headers: h })
    await rt.jsm.streams.deleteMessage(rt.config.streams.dlq, e.seq, false)
    done.push(e)
  }
  return done
}

async function getEntry(rt: Runtime, seq: number): Promise<StoredMsg | null> {
  try {
    return await rt.jsm.streams.getMessage(rt.config.streams.dlq, { seq })
  } catch (err) {
    if ((err as { code?: unknown }).code === 10037) return null // no message found
    throw err
  }
}

function toEntry(m: StoredMsg): DeadLetterEntry {
  const h = (k: string) => m.header.get(k)
  const original: Record<string, string> = {}
  for (const k of m.header.keys()) {
    // The DLQ copy's own Nats-* headers and Fleet-Dlq-* facts are not the event's.
    if (k.startsWith('Nats-')) continue
    if (k.startsWith('Fleet-Dlq-') && !k.startsWith(Headers.DlqOriginalPrefix)) continue
    const name = k.startsWith(Headers.DlqOriginalPrefix)
      ? k.slice(Headers.DlqOriginalPrefix.length)
      : k
    original[name] = m.header.get(k)
  }
  const text = new TextDecoder().decode(m.data)
  let body: unknown = text
  try {
    body = JSON.parse(text)
  } catch {
    // shown as it is: bad JSON is a reason things get parked
  }
  return {
    seq: m.seq,
    processor: h(Headers.DlqProcessor),
    reason: h(Headers.DlqReason),
    detail: h(Headers.DlqDetail),
    attempts: Number(h(Headers.DlqAttempts) || '1'),
    deliveries: Number(h(Headers.DlqDeliveries) || '1'),
    subject: h(Headers.DlqSubject),
    stream: h(Headers.DlqStream),
    streamSeq: Number(h(Headers.DlqStreamSeq)),
    parkedAt: m.time.toISOString(),
    headers: original,
    body,
  }
}
