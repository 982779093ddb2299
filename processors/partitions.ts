/**
 * Slots: what one instance of a processor owns (the whole stream or one partition), their keys and
 * filters, and the check that FLEET_EVENTS is laid out as FLEET_PARTITIONS says.
 */
import { JetStreamApiCodes, JetStreamApiError, type JetStreamManager } from '@nats-io/jetstream'
import { sql } from 'kysely'
import type { Config } from '../infra/config.ts'
import { EVENTS_SUBJECT_PREFIX, eventsFilter, subjectMatches } from '../schemas/subjects.ts'
import type { ProcessorSpec } from './runner/types.ts'
import { OperatorError } from '../schemas/errors.ts'

/**
 * What one instance owns at a time: the whole stream of a processor (not partitioned), or one
 * partition of it. Its key names the durable consumer, the checkpoint row and the lock.
 *
 * | partitions | slots of `readings`                                 | of `sensor-status`                          |
 * |------------|-----------------------------------------------------|---------------------------------------------|
 * | 0          | `readings`: filter `fleet.events.>`                 | `sensor-status`: `fleet.events.>`           |
 * | 4          | `readings-p0` … `readings-p3`: `fleet.events.0.>` … | `sensor-status-p0` …: `fleet.events.0.>` …  |
 *
 * Every consumer reads the whole stream (or partition), whatever kinds its processor handles: an
 * event put back from the DLQ arrives on a longer subject (`<subject>.redrive.<processor>`) that a
 * kind filter such as `fleet.events.*.reading` would not match, and nats-server 2.9 allows one
 * filter per consumer. `decide()` skips the kinds a processor does not read.
 */
export interface Slot {
  /** Durable consumer name, checkpoint key and lock key. */
  readonly key: string
  /** The processor it belongs to (the DLQ and the metrics name the processor). */
  readonly processor: string
  /** `undefined` when the stream is not partitioned. */
  readonly partition: number | undefined
  readonly filterSubject: string
}

/** The slots of a processor, in partition order (one when the stream is not partitioned). */
export function slotsOf(spec: ProcessorSpec, config: Pick<Config, 'partitions'>): Slot[] {
  if (config.partitions === 0) {
    return [
      {
        key: spec.name,
        processor: spec.name,
        partition: undefined,
        filterSubject: processorFilter(spec, config),
      },
    ]
  }
  return Array.from({ length: config.partitions }, (_, p) => ({
    key: `${spec.name}-p${p}`,
    processor: spec.name,
    partition: p,
    filterSubject: eventsFilter('all', p),
  }))
}

/**
 * Every subject the processor's consumers read, across all its partitions (rebuild, replay,
 * metrics): the whole stream, see {@link Slot}.
 */
export function processorFilter(_spec: ProcessorSpec, config: Pick<Config, 'partitions'>): string {
  return eventsFilter('all', config.partitions === 0 ? undefined : '*')
}

/**
 * The rows keyed by `projection`'s name or one of its slots' (`<name>-p<N>`, see {@link slotsOf}):
 * its checkpoints, or its rows of a table several projections share (processors/admin/blue-green.ts).
 */
export function ownRows(key: string, projection: string) {
  return sql<boolean>`(${sql.ref(key)} = ${projection} or ${sql.ref(key)} ~ ${`^${projection}-p[0-9]+$`})`
}

/** FLEET_EVENTS is laid out otherwise than FLEET_PARTITIONS says: nothing would read some events. */
export class PartitionLayoutError extends OperatorError {}

/**
 * Checks that the stream's subjects have the layout `partitions` implies, so that a mismatch
 * between FLEET_PARTITIONS and the server's subject mapping stops set-up with a clear error
 * instead of leaving events that no consumer's filter matches. Looks at the newest message of
 * each wrong shape (`last_by_subj` with wildcards, which nats-server 2.9 serves).
 *
 * Throws for what no device can cause (their permissions allow only one shape); returns as a
 * warning what one could: an event in a partition beyond the count, published straight into it,
 * which looks the same as a mapping with more partitions than FLEET_PARTITIONS says.
 *
 * With `newestOnly`, only the stream's newest event is looked at. A healthy stream holds no
 * message of a wrong shape, so the server answers the full check by scanning the whole stream:
 * 0.26-0.42 s of nats-server CPU per look on a 1M-event stream (measured on the busy 2-core
 * machine), paid for every processor process before its first batch. `run` checks the newest event (a
 * FLEET_PARTITIONS that disagrees with the server's mapping shows there); `setup` scans.
 */
export async function checkPartitionLayout(
  jsm: JetStreamManager,
  stream: string,
  partitions: number,
  opts: { newestOnly?: boolean } = {},
): Promise<string[]> {
  const wrong = partitions === 0 ? `${EVENTS_SUBJECT_PREFIX}.*.*.*` : `${EVENTS_SUBJECT_PREFIX}.*.*`
  const newest = opts.newestOnly
    ? await lastMessage(jsm, stream, `${EVENTS_SUBJECT_PREFIX}.>`)
    : undefined
  const find = (filter: string) =>
    opts.newestOnly
      ? Promise.resolve(newest && subjectMatches(filter, newest.subject) ? newest : undefined)
      : lastMessage(jsm, stream, filter)
  const m = await find(wrong)
  if (m !== undefined) {
    throw new PartitionLayoutError(
      partitions === 0
        ? `${stream} holds partitioned subjects but 'FLEET_PARTITIONS' is 0: set it to N of the server's mapping {{partition(N,1)}}; e.g. '${m.subject}' at sequence ${m.seq}`
        : `${stream} holds subjects without a partition token but 'FLEET_PARTITIONS' is ${partitions}: the server has no partition mapping (nats.conf), or had none when they were stored; e.g. '${m.subject}' at sequence ${m.seq}`,
    )
  }
  if (partitions === 0) return []
  const beyond = await find(`${EVENTS_SUBJECT_PREFIX}.${partitions}.>`)
  return beyond === undefined
    ? []
    : [
        `${stream} holds partition ${partitions} but 'FLEET_PARTITIONS' is ${partitions} (partitions 0 to ${partitions - 1}), so no consumer reads it: 'FLEET_PARTITIONS' must equal N of the server's mapping {{partition(N,1)}}; e.g. '${beyond.subject}' at sequence ${beyond.seq}`,
      ]
}

async function lastMessage(
  jsm: JetStreamManager,
  stream: string,
  filter: string,
): Promise<{ subject: string; seq: number } | undefined> {
  try {
    const m = await jsm.streams.getMessage(stream, { last_by_subj: filter })
    return m === null ? undefined : { subject: m.subject, seq: m.seq }
  } catch (err) {
    if (err instanceof JetStreamApiError && err.code === JetStreamApiCodes.NoMessageFound) {
      return undefined
    }
    throw err
  }
}
