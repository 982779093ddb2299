import type { Transaction } from 'kysely'
import type { DeviceEvent } from '../schemas/events.ts'
import type { CopyIn } from './copy-rows.ts'
import type { AnyProjection, ProjectedEvent } from './projection.ts'
import type { Database } from './tables.ts'

/**
 * The sensors a bulk load folds in memory (sensor-status, alerts): their events go in chunk by
 * chunk, and their rows are written once, by `flush`, as the projection's `apply` would have
 * written them had it been given every event `add` took as one batch.
 */
export interface SensorWindow {
  /** Device events of sensors not written yet, in stream order, no tick among them. */
  add(
    trx: Transaction<Database>,
    events: readonly ProjectedEvent<DeviceEvent>[],
    copy: CopyIn,
  ): Promise<void>
  /** The sensors added so far. */
  readonly deviceIds: ReadonlySet<string>
  /** Writes every sensor added; the window is not used after. */
  flush(trx: Transaction<Database>, copy: CopyIn): Promise<void>
}

/**
 * Default of the sensors a bulk load holds in memory before it writes them: as many as the live
 * path keeps cached (sensor-tracker.ts), ~2 KB each.
 */
const MAX_WINDOW_SENSORS = 25_000

/**
 * A rebuild's bulk load (`BulkLoad` in projection.ts) for a projection whose rows are per
 * sensor: instead of reading and writing each sensor's rows in every chunk it appears in (with
 * 10,000 sensors, every sensor in every 20,000-event chunk), each sensor is folded in memory across
 * chunks ({@link SensorWindow}) and its rows written once, at `finish`; what is history goes in
 * per chunk.
 *
 * Exactly what the projection's `apply` gives, because its rows of one sensor depend only on that
 * sensor's events and the ticks: a window's sensors end as if `apply` had taken all their events
 * as one batch (the tables start empty, and no tick has been applied). So that memory stays
 * bounded, a window holding more than `maxSensors` sensors is written at the end of its chunk; the
 * later events of its sensors go through `apply` chunk by chunk, while new sensors fill a new
 * window. A clock tick (silence is judged over every sensor of a partition at once) writes the
 * window first; from it on, every event goes through `apply`.
 *
 * It holds state across transactions: a chunk whose transaction failed cannot be applied again
 * (the rebuild starts over instead), since the window has taken its events.
 */
export class SensorBulkLoad {
  readonly holdsState = true
  #window: SensorWindow | undefined
  /** Sensors written by a window: their later events go through `apply`. */
  readonly #written = new Set<string>()
  /** After a tick: everything goes through `apply`. */
  #live = false

  constructor(
    private readonly projection: AnyProjection,
    private readonly open: (trx: Transaction<Database>) => Promise<SensorWindow>,
    private readonly maxSensors = MAX_WINDOW_SENSORS,
  ) {}

  async apply(
    trx: Transaction<Database>,
    events: readonly ProjectedEvent[],
    copy: CopyIn,
  ): Promise<void> {
    if (this.#live) return this.projection.apply(trx, events)
    const handled = events.filter((p) => this.projection.handles.includes(p.event.type))
    const tick = handled.findIndex((p) => p.event.type === 'clock.ticked')
    const head = (tick < 0 ? handled : handled.slice(0, tick)) as ProjectedEvent<DeviceEvent>[]
    const fresh: ProjectedEvent<DeviceEvent>[] = []
    const written: ProjectedEvent<DeviceEvent>[] = []
    for (const p of head) (this.#written.has(p.event.deviceId) ? written : fresh).push(p)
    // Other sensors' rows: the two groups may go in either order.
    if (written.length > 0) await this.projection.apply(trx, written)
    if (fresh.length > 0) {
      this.#window ??= await this.open(trx)
      await this.#window.add(trx, fresh, copy)
    }
    if (tick >= 0) {
      await this.#flush(trx, copy)
      this.#live = true
      await this.projection.apply(trx, handled.slice(tick))
    } else if ((this.#window?.deviceIds.size ?? 0) > this.maxSensors) {
      await this.#flush(trx, copy)
    }
  }

  async finish(trx: Transaction<Database>, copy: CopyIn): Promise<void> {
    await this.#flush(trx, copy)
  }

  async #flush(trx: Transaction<Database>, copy: CopyIn): Promise<void> {
    const window = this.#window
    if (window === undefined) return
    this.#window = undefined
    await window.flush(trx, copy)
    for (const id of window.deviceIds) this.#written.add(id)
  }
}

/** `items` in slices of at most `size`. */
export function slices<T>(items: readonly T[], size: number): T[][] {
  const out: T[][] = []
  for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size))
  return out
}
