import { sql } from 'kysely'
import type { ThresholdRule } from './alert-rules.ts'
import {
  afterPlace,
  INPUT_COLUMNS,
  inputsOf,
  keptReadings,
  refold,
  storeInputs,
  type AlertsOptions,
  type KeptFold,
} from './alerts.ts'
import { copyText } from './copy-rows.ts'
import type { AnyProjection } from './projection.ts'
import { HeldInputs } from './held-inputs.ts'
import { RowCache } from './row-cache.ts'
import { SensorBulkLoad, slices, type SensorWindow } from './sensor-bulk-load.ts'
import { SensorTracker } from './sensor-tracker.ts'
import type { AlertHorizonTable, AlertInputTable } from './tables.ts'

/**
 * A rebuild's bulk load of the alerts tables (projections/sensor-bulk-load.ts): each sensor's
 * lifecycle and timeline are folded in memory by the tracker the projection uses, and the inputs
 * the events feed the rules (`alert_inputs`, the history the folds read) are held; at the flush
 * the sensors are written and every rule of every sensor folded once over all its inputs, by the
 * projection's own `refold` (its alerts, conditions, notifications, tips and horizons): what
 * `apply` does with one batch of new sensors. Only the inputs past the horizons are stored then,
 * by COPY: those the window prunes never go in.
 *
 * Held inputs are bounded ({@link MAX_HELD_BYTES}): past that, the window stores them, and what
 * it adds after, as it goes, and its flush reads them back and prunes them in the table.
 *
 * ```ts
 * const load = alertsBulkLoad(spec.projection, { rules, defaultTimeoutSeconds: 300 })
 * ```
 */
export function alertsBulkLoad(
  projection: AnyProjection,
  opts: AlertsOptions,
  maxSensors?: number,
  maxHeldBytes = MAX_HELD_BYTES,
): SensorBulkLoad {
  const rules = opts.rules.rules
  const thresholds = rules.filter((r): r is ThresholdRule => r.kind === 'threshold')
  const window = keptReadings(opts)
  return new SensorBulkLoad(
    projection,
    async (trx): Promise<SensorWindow> => {
      const tracker = new SensorTracker('alert_sensors', 'alerts', opts.defaultTimeoutSeconds)
      // No sensor is stored yet and no tick applied: every sensor starts new, at no stream time.
      const segment = await tracker.load(trx, [])
      const deviceIds = new Set<string>()
      /** Sensors fed an input: folded at the flush even when the tracker did not move them. */
      const fed = new Set<string>()
      /** Inputs not stored yet; undefined once they went to the table. */
      let held: HeldInputs | undefined = new HeldInputs()
      return {
        deviceIds,
        async add(trx, events, copy) {
          const rows: AlertInputTable[] = []
          // The first copy of an input stays, as the live insert's `on conflict do nothing`.
          // Inputs are keyed only once an event id repeats in the chunk (rare).
          const ids = new Set<string>()
          let keys: Set<string> | undefined
          for (const p of events) {
            segment.apply(p)
            deviceIds.add(p.event.deviceId)
            if (keys === undefined && ids.has(p.event.eventId)) keys = new Set(rows.map(inputKey))
            ids.add(p.event.eventId)
            for (const i of inputsOf(thresholds, p.event)) {
              if (keys !== undefined) {
                const k = inputKey(i)
                if (keys.has(k)) continue
                keys.add(k)
              }
              rows.push(i)
              fed.add(i.device_id)
            }
          }
          if (held === undefined) {
            await storeInputs(trx, rows, copy)
            return
          }
          for (const r of rows) held.add(r)
          if (held.bytes <= maxHeldBytes) return
          const all = held
          held = undefined
          for (const group of slices([...deviceIds].sort(), FOLD_SENSORS))
            await storeInputs(trx, [...all.of(group).values()].flat(), copy)
        },
        async flush(trx, copy) {
          const moved = await segment.flush(trx)
          const devices = [...new Set([...moved, ...fed])].sort()
          // Never read back by this process: nothing to keep between folds.
          const folds = new RowCache<KeptFold>(1)
          if (held === undefined) {
            // The inputs went in by COPY, and the table has no statistics yet: without them
            // the planner scans and sorts all of it for each slice's read and prune (measured
            // at 1M events: 18 of the rebuild's 45 s of Postgres CPU).
            await sql`analyze alert_inputs`.execute(trx)
            for (const group of slices(devices, FOLD_SENSORS))
              await refold(trx, tracker, folds, rules, window, group, [])
            return
          }
          const all = held
          held = undefined
          // The inputs kept go aside (nothing here reads them back): Postgres stores a slice's
          // while the next one is folded. One COPY at a time; a failed one is thrown where it is
          // awaited (before the next one, or at the end), never left unhandled meanwhile.
          let sending: Promise<void> = Promise.resolve()
          try {
            for (const group of slices(devices, FOLD_SENSORS)) {
              const inputs = all.of(group)
              const horizons = await refold(
                trx,
                tracker,
                folds,
                rules,
                window,
                group,
                [],
                undefined,
                inputs,
              )
              const kept = pastHorizons([...inputs.values()].flat(), horizons)
              await sending
              if (kept.length === 0) continue
              sending = copy.aside('alert_inputs', INPUT_COLUMNS, copyText(kept, INPUT_COLUMNS))
              sending.catch(() => undefined)
            }
          } catch (err) {
            await sending.catch(() => undefined) // no COPY outlives the flush
            throw err
          }
          await sending
        },
      }
    },
    maxSensors,
  )
}

/**
 * Sensors folded per `refold` at the flush. Their inputs are objects while they are folded, alive
 * across its round trips: at 1M events (150 inputs a sensor), 250 sensors a slice spent ~40% of
 * the flush collecting garbage (the slice outlived the young generation), 100 ~22%, for 2.5x the
 * round trips (~12 small statements a slice).
 */
const FOLD_SENSORS = 100

/**
 * Default of the bytes of inputs a window holds before it stores them (~60 bytes an input): a
 * 1M-event backlog of readings across 10,000 sensors feeds 1.5M, ~90 MB.
 */
const MAX_HELD_BYTES = 256 * 1024 * 1024

/** The inputs a fold keeps: acknowledgements, and readings after their rule's new horizon. */
function pastHorizons(
  inputs: readonly AlertInputTable[],
  horizons: readonly AlertHorizonTable[],
): AlertInputTable[] {
  if (horizons.length === 0) return [...inputs]
  const at = new Map(horizons.map((h) => [`${h.device_id}\u0000${h.rule_id}`, h]))
  return inputs.filter((i) => {
    const h = at.get(`${i.device_id}\u0000${i.rule_id}`)
    return (
      i.kind !== 'reading' || h === undefined || afterPlace(i.hlc, i.event_id, h.hlc, h.event_id)
    )
  })
}

function inputKey(i: AlertInputTable): string {
  return `${i.device_id}\u0000${i.rule_id}\u0000${i.event_id}`
}
