import type { JetStreamClient, JetStreamManager, JsMsg } from '@nats-io/jetstream'
import { headers as natsHeaders } from '@nats-io/transport-node'
import type { RejectReason } from '../schemas/decode.ts'
import { DLQ_SUBJECT_PREFIX, Headers } from '../schemas/subjects.ts'
import { StreamReader } from './stream-reader.ts'

export interface DeadLetter {
  readonly processor: string
  readonly msg: JsMsg
  readonly reason: RejectReason
  readonly detail: string
  /** How often it was tried before it was parked. */
  readonly attempts: number
}

/**
 * Copies a refused event into FLEET_DLQ under `fleet.dlq.<processor>` with why, where from and
 * how often it was delivered, plus its original headers, and waits for the PubAck. Idempotent:
 * the DLQ msgID is the processor plus the event's own `Nats-Msg-Id` (its eventId), so a retry after
 * a crash stores it once. Not the stream sequence: after a stream leader dies, a sequence a
 * processor saw can come back holding another event, and the DLQ's dedup would swallow that
 * one's entry. Messages stored without an id (e.g. from MQTT) fall back to stream + sequence.
 */
export async function parkInDlq(js: JetStreamClient, d: DeadLetter): Promise<void> {
  const h = natsHeaders()
  if (d.msg.headers) {
    for (const key of d.msg.headers.keys()) {
      // Nats-* headers would be interpreted by the DLQ stream (e.g. its dedup): keep them renamed.
      const name = key.startsWith('Nats-') ? `${Headers.DlqOriginalPrefix}${key}` : key
      for (const v of d.msg.headers.values(key)) h.append(name, v)
    }
  }
  h.set(Headers.DlqProcessor, d.processor)
  h.set(Headers.DlqReason, d.reason)
  h.set(Headers.DlqDetail, oneLine(d.detail))
  h.set(Headers.DlqAttempts, String(d.attempts))
  h.set(Headers.DlqDeliveries, String(d.msg.info.deliveryCount))
  h.set(Headers.DlqSubject, d.msg.subject)
  h.set(Headers.DlqStream, d.msg.info.stream)
  h.set(Headers.DlqStreamSeq, String(d.msg.info.streamSequence))
  await js.publish(`${DLQ_SUBJECT_PREFIX}.${d.processor}`, d.msg.data, {
    msgID: `${d.processor}:${parkedKey(d.msg)}`,
    headers: h,
    retries: 5,
  })
}

/** Header values are one line; keep them readable and bounded. */
function oneLine(s: string): string {
  const flat = s.replace(/[\r\n]+/g, ' ')
  return flat.length > 2000 ? `${flat.slice(0, 2000)}…` : flat
}

/**
 * What identifies a parked event: its `Nats-Msg-Id` (the eventId), or stream + sequence for a
 * message stored without one. The DLQ deduplicates on it and a rebuild skips by it.
 */
export function parkedKey(msg: Pick<JsMsg, 'headers' | 'info'>): string {
  return msg.headers?.get(Headers.MsgId) || `${msg.info.stream}:${msg.info.streamSequence}`
}

/**
 * The {@link parkedKey}s of the events `processor` has parked that are still in the DLQ (not
 * redriven), read from the entries' headers. A rebuild skips these, as the live run did.
 */
export async function parkedEvents(
  js: JetStreamClient,
  jsm: JetStreamManager,
  streams: { readonly events: string; readonly dlq: string },
  processor: string,
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
      const m = await reader.next(1000)
      if (m === undefined) {
        if (await reader.drained()) break
        continue
      }
      const h = m.headers
      if (h?.get(Headers.DlqStream) === streams.events) {
        const id = h.get(`${Headers.DlqOriginalPrefix}${Headers.MsgId}`)
        parked.add(id || `${streams.events}:${h.get(Headers.DlqStreamSeq)}`)
      }
      if (reader.pending === 0 && (await reader.drained())) break
    }
  } finally {
    await reader.close()
  }
  return parked
}
