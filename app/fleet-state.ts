/**
 * The figures of a running fleet, read from NATS (stream, consumers, DLQ) and PostgreSQL
 * (checkpoints, open alerts): what `status` reports and the metrics server exports.
 */
import { TransientError } from '../schemas/errors.ts'
import {
  JetStreamApiCodes,
  JetStreamApiError,
  type ConsumerInfo,
  type JetStreamManager,
  type StreamInfo,
} from '@nats-io/jetstream'
import type { Kysely } from 'kysely'
import type { Config } from '../infra/config.ts'
import { consumerInfo } from '../processors/runner/consumer.ts'
import { slotsOf } from '../processors/partitions.ts'
import { readCheckpointRows } from '../processors/progress/checkpoints.ts'
import type { ProcessorSpec } from '../processors/runner/types.ts'
import type { Database } from '../projections/tables.ts'
import { dlqDepth } from '../processors/dlq/inspect.ts'

/**
 * A processor as the figures see it: one per slot (the processor itself, or one of its
 * partitions, e.g. `readings-p2`), named by its consumer and checkpoint, with the subjects that
 * consumer reads and the processor its DLQ entries are filed under.
 */
export interface ProcessorRef {
  readonly name: string
  readonly filterSubject: string
  readonly processor: string
}

/** The figures' view of every slot of `specs` (see {@link slotsOf}). */
export function processorRefs(
  specs: readonly ProcessorSpec[],
  config: Pick<Config, 'partitions'>,
): ProcessorRef[] {
  return specs.flatMap((spec) =>
    slotsOf(spec, config).map((s) => ({
      name: s.key,
      filterSubject: s.filterSubject,
      processor: s.processor,
    })),
  )
}

/** FLEET_EVENTS, its consumers and FLEET_DLQ, as NATS reports them. */
export interface NatsFigures {
  readonly stream: {
    readonly name: string
    readonly messages: number
    readonly bytes: number
    readonly firstSeq: number
    readonly lastSeq: number
    /** When the stream stored its first and last message (null when empty). */
    readonly firstAt: Date | null
    readonly lastAt: Date | null
    /**
     * How full it is, in percent: the larger of its bytes against its own byte limit and the
     * account's file storage against the account's limit (null: neither has a limit). At 100
     * every device's event is refused, and MQTT devices on nats-server 2.9 still get a PUBACK.
     */
    readonly storageUsePercent: number | null
  }
  /** Per processor: the newest stream sequence its filter matches (0: none yet). */
  readonly lastSeq: Readonly<Record<string, number>>
  /** Per processor: its durable consumer's counts; absent when it has no consumer. */
  readonly consumers: Readonly<Record<string, ConsumerFigures | undefined>>
  /** Entries in FLEET_DLQ per processor (processors with none included, as 0; keyed by `processor`). */
  readonly dlq: Readonly<Record<string, number>>
  readonly dlqTotal: number
}

/** A durable consumer's counts, as its consumer info reports them. */
export interface ConsumerFigures {
  /** Matching messages not delivered yet (`num_pending`). */
  readonly pending: number
  /** Delivered and not acked yet (`num_ack_pending`). */
  readonly ackPending: number
  /** Stream sequence of the newest delivery (`delivered.stream_seq`). */
  readonly deliveredSeq: number
}

/** A processor's row in processor_checkpoints. */
export interface CheckpointFigures {
  readonly lastSeq: number
  readonly hlc: string | null
  readonly updatedAt: Date
  /** Seconds since it last moved, by the database's clock (the one that wrote `updatedAt`). */
  readonly ageSeconds: number
}

/** The stream does not exist: nothing was set up yet (an operator's `fleetstream setup` fixes it). */
export class StreamMissingError extends TransientError {}

/**
 * Reads the NATS side of the figures in one round of requests: stream info, one `last_by_subj`
 * look-up and one consumer info per processor, and the DLQ's per-subject counts. A consumer whose
 * counts are `known` (a running instance saw them on its deliveries just now) is not asked for:
 * on nats-server 2.9 the info of a partition's consumer costs ~40 ms of the server's CPU on a
 * 200k-event stream, in its one JetStream API queue.
 */
export async function readNatsFigures(
  jsm: JetStreamManager,
  config: Config,
  processors: readonly ProcessorRef[],
  known: Readonly<Record<string, ConsumerFigures>> = {},
): Promise<NatsFigures> {
  const stream = config.streams.events
  const [info, account, lastSeqs, consumers, dlq] = await Promise.all([
    streamInfo(jsm, stream),
    jsm.getAccountInfo(),
    Promise.all(processors.map((p) => lastMatching(jsm, stream, p.filterSubject))),
    Promise.all(
      processors.map(
        async (p): Promise<ConsumerFigures | undefined> =>
          known[p.name] ?? consumerFigures(await consumerInfo(jsm, stream, p.name)),
      ),
    ),
    dlqDepth({ jsm, config }),
  ])
  const s = info.state
  return {
    stream: {
      name: stream,
      messages: s.messages,
      bytes: s.bytes,
      firstSeq: s.first_seq,
      lastSeq: s.last_seq,
      firstAt: s.messages > 0 ? new Date(s.first_ts) : null,
      lastAt: s.messages > 0 ? new Date(s.last_ts) : null,
      storageUsePercent: usePercent([
        [s.bytes, info.config.max_bytes],
        [account.storage, account.limits.max_storage],
      ]),
    },
    lastSeq: Object.fromEntries(processors.map((p, i) => [p.name, lastSeqs[i] ?? 0])),
    consumers: Object.fromEntries(processors.map((p, i) => [p.name, consumers[i]])),
    dlq: {
      ...Object.fromEntries(processors.map((p) => [p.processor, 0])),
      ...dlq.byProcessor,
    },
    dlqTotal: dlq.total,
  }
}

function consumerFigures(c: ConsumerInfo | undefined): ConsumerFigures | undefined {
  return (
    c && {
      pending: c.num_pending,
      ackPending: c.num_ack_pending,
      deliveredSeq: c.delivered.stream_seq,
    }
  )
}

/** Stream info; a stream that does not exist is a {@link StreamMissingError}. */
export async function streamInfo(jsm: JetStreamManager, stream: string): Promise<StreamInfo> {
  try {
    return await jsm.streams.info(stream)
  } catch (err) {
    if (err instanceof JetStreamApiError && err.code === JetStreamApiCodes.StreamNotFound) {
      throw new StreamMissingError(
        `stream '${stream}' does not exist: run 'fleetstream setup' first`,
        { cause: err },
      )
    }
    throw err
  }
}

/**
 * The newest sequence whose subject matches `filter` (nats-server 2.9 accepts wildcards in
 * `last_by_subj`). A processor's checkpoint only reaches the last message its filter matches,
 * so the lag of a processor reading one kind is measured against that, not the stream's end.
 */
async function lastMatching(jsm: JetStreamManager, stream: string, filter: string) {
  try {
    const m = await jsm.streams.getMessage(stream, { last_by_subj: filter })
    return m?.seq ?? 0
  } catch (err) {
    if (err instanceof JetStreamApiError && err.code === JetStreamApiCodes.NoMessageFound) return 0
    throw err
  }
}

/** Every processor's checkpoint row, by name; absent for one that never committed. */
export async function readCheckpoints(
  db: Kysely<Database>,
  names: readonly string[],
): Promise<Record<string, CheckpointFigures>> {
  if (names.length === 0) return {}
  const rows = await readCheckpointRows(db, names)
  return Object.fromEntries(
    rows.map((r) => [
      r.processor,
      {
        lastSeq: r.lastSeq,
        hlc: r.hlc,
        updatedAt: r.updatedAt,
        ageSeconds: Math.max(0, r.ageSeconds),
      },
    ]),
  )
}

/** Open alerts per severity (every severity present, 0 when none). */
export async function readOpenAlerts(
  db: Kysely<Database>,
): Promise<{ critical: number; warning: number; info: number }> {
  const rows = await db
    .selectFrom('alerts')
    .select(['severity', (eb) => eb.fn.countAll<number>().as('n')])
    .where('state', '=', 'open')
    .groupBy('severity')
    .execute()
  const out = { critical: 0, warning: 0, info: 0 }
  for (const r of rows) out[r.severity] = r.n
  return out
}

/** The highest of used/limit in percent over the pairs that have a limit (> 0); null if none. */
function usePercent(pairs: readonly (readonly [number, number])[]): number | null {
  const shares = pairs.filter(([, limit]) => limit > 0).map(([used, limit]) => (used / limit) * 100)
  return shares.length === 0 ? null : Math.round(Math.max(...shares) * 10) / 10
}
