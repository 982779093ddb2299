/**
 * FLEET_EVENTS as the `events` commands read it: one stored event by sequence, a tail that
 * follows new ones through an ordered consumer, and each presented for people or as JSON.
 */
import { OperatorError } from '../schemas/errors.ts'
import { StreamMissingError } from '../app/fleet-state.ts'
import {
  AckPolicy,
  DeliverPolicy,
  JetStreamApiCodes,
  JetStreamApiError,
  jetstream,
  jetstreamManager,
  type JetStreamClient,
  type JetStreamManager,
  type OrderedConsumerOptions,
} from '@nats-io/jetstream'
import { nanos, type MsgHdrs, type NatsConnection } from '@nats-io/transport-node'
import type { Config } from '../infra/config.ts'
import type { Logger } from '../infra/logger.ts'
import { connectNats } from '../infra/nats.ts'
import { readableHeaders } from '../processors/message-headers.ts'
import { decodeEvent, type RejectReason } from '../schemas/decode.ts'
import { EVENT_KINDS, type EventKind, type FleetEvent } from '../schemas/events.ts'
import { decodeHlc, HlcFormatError } from '../schemas/hlc.ts'
import { printable } from './terminal.ts'
import { ALL_EVENTS, EVENTS_SUBJECT_PREFIX, Headers, parseRedrive } from '../schemas/subjects.ts'

/** What `events tail` and `events show` read from: FLEET_EVENTS over one NATS connection. */
export interface EventsSource {
  readonly js: JetStreamClient
  readonly jsm: JetStreamManager
  /** The events stream (FLEET_EVENTS unless configured otherwise). */
  readonly stream: string
}

/** An HLC with its wall time readable: `1795428000000-000003-gw-1` is 2026-11-23T...Z. */
export interface ReadableHlc {
  readonly value: string
  /** The physical part as an ISO 8601 time. */
  readonly time: string
  readonly counter: number
  readonly node: string
}

/**
 * One stored event as the `events` commands present it: where it is in the stream, its headers,
 * and either the decoded envelope or, for an event no processor would accept, why not and the raw
 * body.
 */
export type ShownEvent = {
  /** Stream sequence in FLEET_EVENTS. */
  readonly seq: number
  readonly subject: string
  /** When the stream stored it (the server's clock). */
  readonly storedAt: string
  readonly headers: Record<string, string>
  /** From the envelope; from the `Fleet-Hlc` header when the body does not decode. */
  readonly hlc: ReadableHlc | null
} & (
  | { readonly ok: true; readonly event: FleetEvent }
  | {
      readonly ok: false
      readonly reason: RejectReason
      /** Names the field, the rule and the value. */
      readonly detail: string
      /** The body as text, as it was stored. */
      readonly body: string
    }
)

/**
 * No event at the sequence asked for: the argument names nothing, so it is bad usage (exit 2), as
 * for `dlq show`, `alerts ack` and `devices revoke` of something that does not exist.
 */
export class EventNotFoundError extends OperatorError {}

/** The event kinds a `--kind` filter accepts (the last subject token). */
export const EVENT_KIND_NAMES: readonly EventKind[] = [...new Set(Object.values(EVENT_KINDS))]

/** Connects to NATS only: the `events` commands need no database, so they work while it is down. */
export async function openEventsSource(
  config: Config,
  log: Logger,
  opts: { name: string; signal?: AbortSignal; deadline?: number },
): Promise<EventsSource & { readonly nc: NatsConnection; close(): Promise<void> }> {
  const nc = await connectNats(config, {
    name: opts.name,
    log,
    signal: opts.signal,
    deadline: opts.deadline,
  })
  return {
    nc,
    js: jetstream(nc),
    jsm: await jetstreamManager(nc, { checkAPI: false }),
    stream: config.streams.events,
    async close() {
      await nc.drain().catch(() => undefined)
    },
  }
}

/**
 * The event at `seq`, decoded if it decodes.
 *
 * ```ts
 * const e = await showEvent(src, 42)
 * if (!e.ok) console.log(e.reason, e.detail, e.body)
 * ```
 */
export async function showEvent(src: EventsSource, seq: number): Promise<ShownEvent> {
  let m
  try {
    m = await src.jsm.streams.getMessage(src.stream, { seq })
  } catch (err) {
    throw streamMissing(src, err)
  }
  if (m === null) {
    const state = await streamState(src)
    throw new EventNotFoundError(
      `no event at sequence ${seq} in ${src.stream}: it holds ${
        state.messages === 0 ? 'no events yet' : `sequences ${state.first_seq} to ${state.last_seq}`
      }`,
    )
  }
  return presentEvent({
    seq: m.seq,
    subject: m.subject,
    storedAt: m.time,
    // A block the NATS client refuses (a device's raw HPUB) is shown without headers.
    headers: readableHeaders({
      get headers() {
        return m.header
      },
    }),
    data: m.data,
  })
}

export interface TailOptions {
  readonly deviceId?: string | undefined
  readonly kind?: EventKind | undefined
  /** Start at this stream sequence. */
  readonly fromSeq?: number | undefined
  /** Start at events stored at or after this time. */
  readonly since?: Date | undefined
  /** Without `fromSeq` or `since`: start with the newest `last` matching events (0: only new ones). */
  readonly last: number
  /** Stop after this many events; follow until the signal aborts when omitted. */
  readonly limit?: number | undefined
  /** Told where the tail starts, before the first event. */
  readonly onStart?: (start: { filter: string; fromSeq?: number; since?: Date }) => void
}

/**
 * Follows FLEET_EVENTS like `tail -f`: the newest events first, then new ones as they are stored,
 * until `signal` aborts or `limit` is reached. Reads through an ordered consumer (ack none, in
 * memory, one replica), deleted at the end and expired by the server if this process dies, so
 * nothing durable is left behind and no processor's consumer is touched.
 *
 * ```ts
 * for await (const e of tailEvents(src, { kind: 'reading', last: 10 }, signal)) print(e)
 * ```
 */
export async function* tailEvents(
  src: EventsSource,
  opts: TailOptions,
  signal: AbortSignal,
): AsyncGenerator<ShownEvent> {
  const filter = eventFilter(opts.deviceId, opts.kind)
  const start: Partial<OrderedConsumerOptions> =
    opts.since !== undefined
      ? { deliver_policy: DeliverPolicy.StartTime, opt_start_time: opts.since.toISOString() }
      : {
          deliver_policy: DeliverPolicy.StartSequence,
          opt_start_seq: opts.fromSeq ?? (await startOfNewest(src, filter, opts.last)),
        }
  if (signal.aborted) return
  opts.onStart?.({
    filter,
    ...(start.opt_start_seq !== undefined ? { fromSeq: start.opt_start_seq } : {}),
    ...(opts.since !== undefined ? { since: opts.since } : {}),
  })
  let consumer
  try {
    consumer = await src.js.consumers.get(src.stream, { filter_subjects: filter, ...start })
  } catch (err) {
    throw streamMissing(src, err)
  }
  const messages = await consumer.consume({ max_messages: 256 }).catch(async (err: unknown) => {
    await consumer.delete().catch(() => false)
    throw err
  })
  const stop = () => {
    messages.stop()
  }
  signal.addEventListener('abort', stop, { once: true })
  // eslint-disable-next-line @typescript-eslint/no-unnecessary-condition -- TS narrowed it before the awaits above; Ctrl-C may have come since
  if (signal.aborted) stop()
  let seen = 0
  try {
    for await (const m of messages) {
      yield presentEvent({
        seq: m.seq,
        subject: m.subject,
        storedAt: m.time,
        headers: readableHeaders(m),
        data: m.data,
      })
      seen++
      if (opts.limit !== undefined && seen >= opts.limit) break
    }
  } finally {
    signal.removeEventListener('abort', stop)
    messages.stop()
    await consumer.delete().catch(() => false)
  }
}

/** `fleet.events.<deviceId>.<kind>` with `*` for what is not given; every event when neither is. */
export function eventFilter(deviceId?: string, kind?: string): string {
  if (deviceId === undefined && kind === undefined) return ALL_EVENTS
  return `${EVENTS_SUBJECT_PREFIX}.${deviceId ?? '*'}.${kind ?? '*'}`
}

/**
 * The stream sequence from which `filter` matches exactly the newest `n` events (the first
 * sequence when fewer match, the next one to be stored when `n` is 0). Without a filter this is
 * arithmetic; with one, nats-server 2.9 has no reverse scan, so it counts matches from a candidate
 * sequence with a short-lived consumer (its `num_pending`), widening backwards, then bisecting.
 */
export async function startOfNewest(src: EventsSource, filter: string, n: number): Promise<number> {
  const state = await streamState(src)
  const next = state.last_seq + 1
  if (state.messages === 0 || n === 0) return next
  const first = Math.max(state.first_seq, 1)
  if (filter === ALL_EVENTS) return Math.max(first, next - n)
  const matching = (from: number) => countFrom(src, filter, from)
  // Invariant: fewer than n match from `hi` on; at least n match from `lo` on, unless lo is first.
  let hi = next
  let lo = first
  for (let width = n; ; width *= 8) {
    const candidate = Math.max(first, next - width)
    if (candidate === first) break
    if ((await matching(candidate)) >= n) {
      lo = candidate
      break
    }
    hi = candidate
  }
  if (lo === first && (await matching(first)) < n) return first
  while (hi - lo > 1) {
    const mid = Math.floor((lo + hi) / 2)
    if ((await matching(mid)) >= n) lo = mid
    else hi = mid
  }
  return lo
}

/** How many events matching `filter` the stream holds from sequence `from` on. */
async function countFrom(src: EventsSource, filter: string, from: number): Promise<number> {
  const ci = await src.jsm.consumers.add(src.stream, {
    description: 'fleetstream events tail: counting where to start (deleted at once)',
    ack_policy: AckPolicy.None,
    deliver_policy: DeliverPolicy.StartSequence,
    opt_start_seq: from,
    filter_subject: filter,
    mem_storage: true,
    num_replicas: 1,
    inactive_threshold: nanos(30_000),
  })
  await src.jsm.consumers.delete(src.stream, ci.name).catch(() => false)
  return ci.num_pending
}

async function streamState(src: EventsSource) {
  try {
    return (await src.jsm.streams.info(src.stream)).state
  } catch (err) {
    throw streamMissing(src, err)
  }
}

function streamMissing(src: EventsSource, err: unknown): unknown {
  if (err instanceof JetStreamApiError && err.code === JetStreamApiCodes.StreamNotFound) {
    return new StreamMissingError(
      `stream ${src.stream} does not exist on this server: run 'fleetstream setup' (or check NATS_URL)`,
      { cause: err },
    )
  }
  return err
}

/** A stored message to a {@link ShownEvent}; never throws on a bad body. */
export function presentEvent(m: {
  seq: number
  subject: string
  storedAt: Date
  headers: MsgHdrs | undefined
  data: Uint8Array
}): ShownEvent {
  const headers: Record<string, string> = {}
  for (const k of m.headers?.keys() ?? []) headers[k] = m.headers?.values(k).join(', ') ?? ''
  // A copy put back from the DLQ is known by its subject (see redriveSubject), never a header.
  const redrive = parseRedrive(m.subject)
  const decoded = decodeEvent({
    subject: redrive?.subject ?? m.subject,
    data: m.data,
    // A copy put back from the DLQ has its own Nats-Msg-Id (redrive:...), not the eventId.
    msgId: redrive !== undefined ? undefined : headers[Headers.MsgId],
  })
  const where = { seq: m.seq, subject: m.subject, storedAt: m.storedAt.toISOString(), headers }
  if (decoded.ok) {
    return { ...where, hlc: readableHlc(decoded.event.hlc), ok: true, event: decoded.event }
  }
  return {
    ...where,
    hlc: readableHlc(headers[Headers.Hlc]),
    ok: false,
    reason: decoded.reason,
    detail: decoded.detail,
    body: new TextDecoder().decode(m.data),
  }
}

/** `1795428000000-000003-gw-1` with its wall time as ISO 8601; null when it is not an HLC. */
export function readableHlc(value: string | undefined): ReadableHlc | null {
  if (value === undefined) return null
  try {
    const h = decodeHlc(value)
    return { value, time: new Date(h.wallMs).toISOString(), counter: h.logical, node: h.node }
  } catch (err) {
    if (err instanceof HlcFormatError) return null
    throw err
  }
}

/**
 * One event for people, a field per line:
 *
 * ```txt
 * seq:         42 (stored 2026-11-23T10:00:00.130Z)
 * subject:     fleet.events.sensor-7.reading
 * type:        reading.recorded (version 1)
 * ...
 * hlc:         1795428000123-000000-gw-1 (2026-11-23T10:00:00.123Z, counter 0, node gw-1)
 * ```
 */
export function formatEvent(e: ShownEvent): string {
  const lines = [`seq:         ${e.seq} (stored ${e.storedAt})`, `subject:     ${e.subject}`]
  if (e.ok) {
    const ev = e.event
    lines.push(
      `type:        ${ev.type} (version ${ev.version})`,
      `eventId:     ${ev.eventId}`,
      `deviceId:    ${ev.deviceId}`,
      `occurredAt:  ${ev.occurredAt} (device clock)`,
      `hlc:         ${formatHlc(e.hlc) ?? ev.hlc}`,
      `correlation: ${ev.correlationId}`,
      `causation:   ${ev.causationId ?? '-'}`,
      `data:        ${JSON.stringify(ev.data)}`,
    )
  } else {
    const hlc = formatHlc(e.hlc)
    lines.push(
      `undecodable: ${e.reason}: ${e.detail}`,
      `hlc:         ${hlc === undefined ? '-' : `${hlc} from the ${Headers.Hlc} header`}`,
      `body:        ${printable(e.body)}`,
    )
  }
  lines.push('headers:', ...Object.entries(e.headers).map(([k, v]) => `  ${k}: ${v}`))
  return lines.join('\n')
}

function formatHlc(h: ReadableHlc | null): string | undefined {
  return h === null ? undefined : `${h.value} (${h.time}, counter ${h.counter}, node ${h.node})`
}
