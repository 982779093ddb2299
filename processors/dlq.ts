import type { JetStreamClient, JsMsg } from '@nats-io/jetstream'
import { headers as natsHeaders } from '@nats-io/transport-node'
import type { RejectReason } from '../schemas/decode.ts'
import { DLQ_SUBJECT_PREFIX, Headers } from '../schemas/subjects.ts'

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
 * the DLQ msgID is processor + stream sequence, so a retry after a crash stores it once.
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
    msgID: `${d.processor}:${d.msg.info.stream}:${d.msg.info.streamSequence}`,
    headers: h,
    retries: 5,
  })
}

/** Header values are one line; keep them readable and bounded. */
function oneLine(s: string): string {
  const flat = s.replace(/[\r\n]+/g, ' ')
  return flat.length > 2000 ? `${flat.slice(0, 2000)}…` : flat
}
