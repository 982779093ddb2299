import { OperatorError, TransientError } from '../schemas/errors.ts'
import {
  DiscardPolicy,
  JetStreamApiCodes,
  JetStreamApiError,
  jetstreamManager,
  RetentionPolicy,
  StorageType,
  type JetStreamManager,
  type StreamConfig,
  type StreamInfo,
} from '@nats-io/jetstream'
import { nanos, type NatsConnection } from '@nats-io/transport-node'
import {
  DLQ_SUBJECT_PREFIX,
  EVENTS_SUBJECT_PREFIX,
  NOTIFICATIONS_SUBJECT_PREFIX,
} from '../schemas/subjects.ts'
import type { Config } from './config.ts'
import { isPermissionViolation } from './failures.ts'

/** JetStream API error 10058: a stream with that name already exists (with another config). */
const STREAM_NAME_IN_USE = 10058

/** The settings fleetstream owns on a stream; anything else the server fills in is left alone. */
export type StreamSpec = Pick<
  StreamConfig,
  | 'name'
  | 'description'
  | 'subjects'
  | 'retention'
  | 'storage'
  | 'discard'
  | 'max_msgs'
  | 'max_bytes'
  | 'max_age'
  | 'max_msg_size'
  | 'duplicate_window'
  | 'num_replicas'
  | 'deny_delete'
  | 'deny_purge'
  | 'allow_rollup_hdrs'
>

/**
 * FLEET_EVENTS: the one source of truth. Append-only (no delete, no purge, no rollups), kept
 * forever, and when a byte limit is set it refuses new events rather than dropping old ones.
 */
export function eventsStreamSpec(c: Config['streams']): StreamSpec {
  return {
    name: c.events,
    description: 'fleetstream device events: append-only source of truth',
    subjects: [`${EVENTS_SUBJECT_PREFIX}.>`],
    retention: RetentionPolicy.Limits,
    storage: StorageType.File,
    discard: DiscardPolicy.New,
    max_msgs: -1,
    max_bytes: c.maxBytes,
    max_age: 0,
    max_msg_size: c.maxMsgBytes,
    duplicate_window: nanos(c.duplicateWindowSeconds * 1000),
    num_replicas: c.replicas,
    deny_delete: true,
    deny_purge: true,
    allow_rollup_hdrs: false,
  }
}

/** How long FLEET_DLQ remembers an entry's id, so that parking an event again stores nothing. */
export const DLQ_DEDUP_WINDOW_MS = 24 * 3600 * 1000

/** FLEET_DLQ: parked events with their reason, browsable, kept for a limited time. */
export function dlqStreamSpec(c: Config['streams']): StreamSpec {
  return {
    name: c.dlq,
    description: 'fleetstream dead letters: events a processor refused, with the reason',
    subjects: [`${DLQ_SUBJECT_PREFIX}.>`],
    retention: RetentionPolicy.Limits,
    storage: StorageType.File,
    discard: DiscardPolicy.Old,
    max_msgs: -1,
    max_bytes: -1,
    max_age: nanos(c.dlqMaxAgeDays * 24 * 3600 * 1000),
    // Room for the original event plus the DLQ headers.
    max_msg_size: c.maxMsgBytes + 8 * 1024,
    // One entry per (processor, event): a processor parks an event before the commit that passes
    // it, so a crash or a Postgres outage between the two parks it again when the processor is
    // back, which can be hours later. The DLQ's dedup (by processor + event id) covers a day of
    // that; nats-server keeps each id of the window in memory, about 150 bytes each, and a DLQ
    // holds few entries next to the events (a longer window costs memory, a shorter one copies).
    duplicate_window: nanos(Math.min(DLQ_DEDUP_WINDOW_MS, c.dlqMaxAgeDays * 24 * 3600 * 1000)),
    num_replicas: c.replicas,
    deny_delete: false,
    deny_purge: true,
    allow_rollup_hdrs: false,
  }
}

/**
 * FLEET_NOTIFICATIONS: alert notifications from the alerts outbox, one subject each, kept for a
 * year so the relay can tell what it already sent (also after a replay of the alerts projection).
 * No purge: an emptied stream would make the relay page again for every open alert.
 */
export function notificationsStreamSpec(c: Config['streams']): StreamSpec {
  return {
    name: c.notifications,
    description: 'fleetstream alert notifications (raised, resolved), sent once from the outbox',
    subjects: [`${NOTIFICATIONS_SUBJECT_PREFIX}.>`],
    retention: RetentionPolicy.Limits,
    storage: StorageType.File,
    discard: DiscardPolicy.Old,
    max_msgs: -1,
    max_bytes: -1,
    max_age: nanos(365 * 24 * 3600 * 1000),
    max_msg_size: 64 * 1024,
    duplicate_window: nanos(120_000),
    num_replicas: c.replicas,
    deny_delete: false,
    deny_purge: true,
    allow_rollup_hdrs: false,
  }
}

/**
 * The stream does not exist and this user may not create it (the processor role): an operator
 * runs `fleetstream setup` as admin, and the caller waits for it (a transient failure).
 */
export class StreamNotSetUpError extends TransientError {
  constructor(
    readonly stream: string,
    options?: ErrorOptions,
  ) {
    super(
      `stream ${stream} does not exist and this NATS user may not create it: waiting for ` +
        `'fleetstream setup' (run as the admin role)`,
      options,
    )
  }
}

/** A stream exists with settings that differ from what fleetstream needs; nothing was changed. */
export class StreamConflictError extends OperatorError {
  constructor(
    readonly stream: string,
    readonly differences: readonly string[],
  ) {
    super(
      `stream ${stream} exists with a conflicting configuration (left unchanged): ` +
        `${differences.join('; ')}. Align the environment with the stream, or migrate the ` +
        `stream deliberately (nats stream info ${stream}).`,
    )
  }
}

export type EnsureResult = 'created' | 'updated' | 'unchanged'

/**
 * Settings `setup` changes in place on an existing stream: changing them loses nothing and no
 * client depends on the old value (a longer duplicate window only remembers ids for longer).
 */
const UPDATABLE: ReadonlySet<keyof StreamSpec> = new Set(['duplicate_window'])

/**
 * Creates the stream if it is missing; if it exists, checks every setting fleetstream owns and
 * throws {@link StreamConflictError} listing each difference instead of silently changing it.
 * Running it twice is a no-op.
 */
export async function ensureStream(
  jsm: JetStreamManager,
  spec: StreamSpec,
  sources: SettingSources = {},
): Promise<EnsureResult> {
  const existing = await streamInfo(jsm, spec.name)
  if (existing === undefined) {
    try {
      await jsm.streams.add(spec)
      return 'created'
    } catch (err) {
      if (isPermissionViolation(err)) throw new StreamNotSetUpError(spec.name, { cause: err })
      // Another process created it meanwhile: fall through to the comparison.
      if (!(err instanceof JetStreamApiError && err.code === STREAM_NAME_IN_USE)) throw err
    }
  }
  const info = existing ?? (await jsm.streams.info(spec.name))
  const differences = streamDifferences(spec, info.config, sources)
  if (differences.length > 0) throw new StreamConflictError(spec.name, differences)
  const updates = (Object.keys(spec) as (keyof StreamSpec)[]).filter(
    (key) => UPDATABLE.has(key) && spec[key] !== info.config[key],
  )
  if (updates.length === 0) return 'unchanged'
  await jsm.streams.update(spec.name, { ...info.config, ...spec })
  return 'updated'
}

/** Every fleetstream stream; returns what was done to each. */
export async function ensureStreams(
  jsm: JetStreamManager,
  c: Config['streams'],
): Promise<Record<string, EnsureResult>> {
  const out: Record<string, EnsureResult> = {}
  const sources = settingSources(c)
  for (const spec of [eventsStreamSpec(c), dlqStreamSpec(c), notificationsStreamSpec(c)]) {
    out[spec.name] = await ensureStream(jsm, spec, sources[spec.name])
  }
  return out
}

/** Which variable (and its value) sets a stream setting, for an operator who must align them. */
export type SettingSources = Partial<Record<keyof StreamSpec, string>>

/** The variables behind the settings of each stream (README.md, "Configuration"). */
export function settingSources(c: Config['streams']): Record<string, SettingSources> {
  const replicas = `FLEET_STREAM_REPLICAS=${c.replicas}`
  return {
    [c.events]: {
      max_bytes: `FLEET_STREAM_MAX_BYTES=${c.maxBytes}`,
      max_msg_size: `FLEET_MAX_MSG_BYTES=${c.maxMsgBytes}`,
      duplicate_window: `FLEET_DUPLICATE_WINDOW_SECONDS=${c.duplicateWindowSeconds}`,
      num_replicas: replicas,
    },
    [c.dlq]: {
      max_age: `DLQ_MAX_AGE_DAYS=${c.dlqMaxAgeDays}`,
      max_msg_size: `FLEET_MAX_MSG_BYTES=${c.maxMsgBytes}, plus 8 KiB for the DLQ headers`,
      duplicate_window: `DLQ_MAX_AGE_DAYS=${c.dlqMaxAgeDays}, at most a day`,
      num_replicas: replicas,
    },
    [c.notifications]: { num_replicas: replicas },
  }
}

/** A setting as people read it: durations (nanoseconds on the wire) in s, h or days; -1 unlimited. */
function settingText(key: keyof StreamSpec, v: unknown): string {
  if ((key === 'max_age' || key === 'duplicate_window') && typeof v === 'number') {
    if (v === 0) return 'unlimited'
    const seconds = v / 1e9
    if (seconds % 86_400 === 0) return `${seconds / 86_400} days`
    if (seconds % 3600 === 0) return `${seconds / 3600} h`
    return `${seconds} s`
  }
  if ((key === 'max_bytes' || key === 'max_msg_size') && v === -1) return 'unlimited'
  if ((key === 'max_bytes' || key === 'max_msg_size') && typeof v === 'number') return `${v} bytes`
  return JSON.stringify(v)
}

/**
 * The settings of `actual` that differ from `spec` and that `setup` does not change itself, each
 * naming the variable that sets it when one does:
 * `max_age is 7 days, fleetstream expects 30 days (DLQ_MAX_AGE_DAYS=30)`.
 */
export function streamDifferences(
  spec: StreamSpec,
  actual: StreamConfig,
  sources: SettingSources = {},
): string[] {
  const out: string[] = []
  for (const key of Object.keys(spec) as (keyof StreamSpec)[]) {
    if (key === 'description' || UPDATABLE.has(key)) continue
    const want = spec[key]
    const have = actual[key]
    const same =
      key === 'subjects'
        ? [...(want as string[])].sort().join(',') === [...(have as string[])].sort().join(',')
        : want === have
    if (!same) {
      const source = sources[key]
      out.push(
        `${key} is ${settingText(key, have)}, fleetstream expects ${settingText(key, want)}${source ? ` (${source})` : ''}`,
      )
    }
  }
  return out
}

async function streamInfo(jsm: JetStreamManager, name: string): Promise<StreamInfo | undefined> {
  try {
    return await jsm.streams.info(name)
  } catch (err) {
    if (err instanceof JetStreamApiError && err.code === JetStreamApiCodes.StreamNotFound)
      return undefined
    throw err
  }
}

/** MQTT's stream of QoS 1 messages, in the MQTT_DEVICES account (infra/nats/accounts.conf). */
export const MQTT_MESSAGES_STREAM = '$MQTT_msgs'
/** Where the FLEET account reaches that stream's API: accounts.conf imports it under this prefix. */
export const MQTT_DEVICES_API_PREFIX = '$JS.MQTT_DEVICES.API'

export type MqttStreamResult = EnsureResult | 'updated' | 'unreachable'

/**
 * Sizes MQTT's message stream like FLEET_EVENTS, so that an MQTT device is refused what the
 * stream would drop. nats-server 2.9 stores every QoS 1 MQTT publish twice: it delivers it (to
 * FLEET_EVENTS, which silently drops what is over its max_msg_size) and then stores it in
 * `$MQTT_msgs`, and sends the PUBACK only if that store succeeds; it never checks an MQTT
 * payload's size itself. With `$MQTT_msgs`'s max_msg_size equal to FLEET_EVENTS's, an oversize
 * publish gets no PUBACK and the device is disconnected. The server creates `$MQTT_msgs` when the
 * first MQTT client connects and uses an existing one as it is, so this creates it with the
 * server's own settings plus the size limit, or updates the limit.
 *
 * 'unreachable': this server has no MQTT_DEVICES import (a plain test server) or the user may
 * not use it; nothing was done.
 */
export async function ensureMqttMessagesStream(
  nc: NatsConnection,
  c: Config['streams'],
): Promise<MqttStreamResult> {
  const jsm = await jetstreamManager(nc, { apiPrefix: MQTT_DEVICES_API_PREFIX, checkAPI: false })
  let info: StreamInfo | undefined
  try {
    info = await streamInfo(jsm, MQTT_MESSAGES_STREAM)
  } catch {
    return 'unreachable'
  }
  if (info === undefined) {
    await jsm.streams.add({
      name: MQTT_MESSAGES_STREAM,
      subjects: ['$MQTT.msgs.>'],
      storage: StorageType.File,
      retention: RetentionPolicy.Interest,
      num_replicas: c.replicas,
      max_msg_size: c.maxMsgBytes,
    })
    return 'created'
  }
  if (info.config.max_msg_size === c.maxMsgBytes) return 'unchanged'
  await jsm.streams.update(MQTT_MESSAGES_STREAM, { max_msg_size: c.maxMsgBytes })
  return 'updated'
}
