/**
 * Redriving parked events: each is put back into FLEET_EVENTS for the processor that parked it,
 * at a bounded rate, and its DLQ entry deleted once the copy is stored (`dlq redrive`).
 */
import type { JetStreamClient } from '@nats-io/jetstream'
import { headers as natsHeaders, type MsgHdrs } from '@nats-io/transport-node'
import { errorSummary } from '../../infra/retry.ts'
import { sleep } from '../../infra/sleep.ts'
import { Headers, redriveSubject } from '../../schemas/subjects.ts'
import {
  DlqCommandError,
  getEntry,
  listDlq,
  showDlq,
  type DeadLetterEntry,
  type DlqStreams,
} from './inspect.ts'
import { originalHeaders, parkedKey } from './park.ts'

/** Where the DLQ is, and a JetStream client to publish the copies with. */
export interface RedriveStreams extends DlqStreams {
  readonly js: JetStreamClient
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
export async function redriveDlq(rt: RedriveStreams, o: RedriveOptions): Promise<RedriveResult> {
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
async function redriveOne(rt: RedriveStreams, e: DeadLetterEntry): Promise<boolean> {
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
