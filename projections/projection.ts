import type { Transaction } from 'kysely'
import type { EventOfType, EventType, FleetEvent } from '../schemas/events.ts'
import type { CopyIn, CopySend } from './copy-rows.ts'
import type { Database } from './tables.ts'

/** A validated event as a processor hands it to a projection. */
export interface ProjectedEvent<E extends FleetEvent = FleetEvent> {
  readonly event: E
  /** FLEET_EVENTS sequence. */
  readonly streamSeq: number
  /** When the stream stored it: time for projections comes from here or the event, never the wall clock. */
  readonly ingestedAt: Date
  /**
   * The partition its subject carries (the server maps device ids to partitions); `undefined`
   * on a stream that is not partitioned. Stream time (clock ticks) is kept per partition.
   */
  readonly partition?: number
}

/**
 * Event -> SQL. `apply` runs inside the processor's transaction, together with its checkpoint,
 * and must be idempotent by eventId: applying the same event twice changes nothing. `copy`, when
 * given, sends COPY payloads in `trx` (a processor's commit gives it; a test's plain transaction
 * may not): for rows that are only inserted, with {@link copyPayload}'s fallback for keys stored
 * already.
 *
 * ```ts
 * export const readingsProjection: Projection<'reading.recorded'> = {
 *   name: 'readings', handles: ['reading.recorded'], tables: ['readings', 'latest_readings'],
 *   async apply(trx, events) { ... set-based upserts ... },
 * }
 * ```
 */
export interface Projection<T extends EventType = EventType> {
  readonly name: string
  readonly handles: readonly T[]
  readonly tables: readonly (keyof Database)[]
  apply(
    trx: Transaction<Database>,
    events: readonly ProjectedEvent<EventOfType<T>>[],
    copy?: CopySend,
  ): Promise<void>
}

/** A projection that takes any events and applies the ones it handles; what processors run. */
export interface AnyProjection {
  readonly name: string
  readonly handles: readonly EventType[]
  readonly tables: readonly (keyof Database)[]
  apply(
    trx: Transaction<Database>,
    events: readonly ProjectedEvent[],
    copy?: CopySend,
  ): Promise<void>
}

export function anyEvents<T extends EventType>(projection: Projection<T>): AnyProjection {
  const handles: readonly EventType[] = projection.handles
  const mine = (e: ProjectedEvent): e is ProjectedEvent<EventOfType<T>> =>
    handles.includes(e.event.type)
  return {
    name: projection.name,
    handles,
    tables: projection.tables,
    apply: (trx, events, copy) => projection.apply(trx, events.filter(mine), copy),
  }
}

/**
 * The bulk phase of a rebuild: `apply` takes the stream in order, chunk by chunk, into tables
 * that started empty (`copy` sends COPY payloads in `trx`); `finish` runs once, after the last
 * chunk, and leaves the tables exactly as the projection's `apply` would have; from then on the
 * projection's own `apply` follows.
 */
export interface BulkLoad {
  apply(trx: Transaction<Database>, events: readonly ProjectedEvent[], copy: CopyIn): Promise<void>
  finish(trx: Transaction<Database>, copy: CopyIn): Promise<void>
  /**
   * It keeps what chunks gave it in memory until `finish` (or writes it in a later chunk): a chunk
   * whose transaction failed cannot be given again, and the rebuild starts over instead.
   */
  readonly holdsState?: boolean
}
