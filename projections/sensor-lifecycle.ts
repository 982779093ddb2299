import type { DeviceEvent, SensorStatus } from '../schemas/events.ts'
import { checkedHlcWallMs } from '../schemas/hlc.ts'

/** What fleetstream says about a sensor; `unknown` is "not heard from within its timeout". */
export type EffectiveStatus = SensorStatus | 'unknown'

/**
 * What a sensor's status is decided from. Every field is a maximum or a last-writer-wins value
 * by (HLC, event id), so the same set of events gives the same lifecycle whatever order they
 * arrive in and however often: that is what makes shuffled, duplicated input converge. The event
 * id breaks ties between distinct events that carry the same HLC.
 */
export interface SensorLifecycle {
  /** Newest HLC of an event that shows the sensor alive (registration, reading, heartbeat, status change). */
  readonly lastSeenHlc: string | null
  readonly lastSeenEventId: string | null
  /** Newest registration. */
  readonly registeredHlc: string | null
  readonly registeredEventId: string | null
  readonly site: string | null
  readonly model: string | null
  readonly firmware: string | null
  readonly inactivityTimeoutSeconds: number | null
  /** Newest decommissioning; it holds until a newer registration. */
  readonly decommissionedHlc: string | null
  /** Newest explicit status other than decommissioned. */
  readonly declaredStatus: Exclude<SensorStatus, 'decommissioned'> | null
  readonly declaredHlc: string | null
  readonly declaredEventId: string | null
}

export const NEW_SENSOR: SensorLifecycle = {
  lastSeenHlc: null,
  lastSeenEventId: null,
  registeredHlc: null,
  registeredEventId: null,
  site: null,
  model: null,
  firmware: null,
  inactivityTimeoutSeconds: null,
  decommissionedHlc: null,
  declaredStatus: null,
  declaredHlc: null,
  declaredEventId: null,
}

/** Folds one event into a lifecycle. Pure; applying the same event twice changes nothing. */
export function observe(s: SensorLifecycle, e: DeviceEvent): SensorLifecycle {
  if (e.type === 'alert.acknowledged') return s // an operator action, not a sign of life
  let next = s
  if (wins(e, s.lastSeenHlc, s.lastSeenEventId))
    next = { ...next, lastSeenHlc: e.hlc, lastSeenEventId: e.eventId }
  switch (e.type) {
    case 'sensor.registered':
      if (wins(e, s.registeredHlc, s.registeredEventId)) {
        next = {
          ...next,
          registeredHlc: e.hlc,
          registeredEventId: e.eventId,
          site: e.data.site,
          model: e.data.model,
          firmware: e.data.firmware,
          inactivityTimeoutSeconds: e.data.inactivityTimeoutSeconds ?? null,
        }
      }
      break
    case 'status.changed':
      if (e.data.status === 'decommissioned') {
        if (newer(e.hlc, s.decommissionedHlc)) next = { ...next, decommissionedHlc: e.hlc }
      } else if (wins(e, s.declaredHlc, s.declaredEventId)) {
        next = {
          ...next,
          declaredStatus: e.data.status,
          declaredHlc: e.hlc,
          declaredEventId: e.eventId,
        }
      }
      break
    default:
      break
  }
  return next
}

/**
 * The status a lifecycle means at stream time `nowMs` (the newest clock tick seen; `null` before
 * the first tick, when nothing can be silent yet).
 *
 * - decommissioned, if decommissioned after its newest registration;
 * - else the newest declared status, if declared after its newest registration;
 * - else active, or unknown when not seen for longer than its inactivity timeout.
 */
export function effectiveStatus(
  s: SensorLifecycle,
  nowMs: number | null,
  defaultTimeoutSeconds: number,
): EffectiveStatus {
  if (s.decommissionedHlc !== null && newer(s.decommissionedHlc, s.registeredHlc))
    return 'decommissioned'
  const base =
    s.declaredHlc !== null && newer(s.declaredHlc, s.registeredHlc) ? s.declaredStatus : 'active'
  if (base === 'active' && isSilent(s, nowMs, defaultTimeoutSeconds)) return 'unknown'
  return base ?? 'active'
}

/** Not seen for longer than its timeout at `nowMs`. Mirrors the SQL in {@link silentSince}. */
export function isSilent(
  s: SensorLifecycle,
  nowMs: number | null,
  defaultTimeoutSeconds: number,
): boolean {
  if (nowMs === null || s.lastSeenHlc === null) return false
  const timeout = (s.inactivityTimeoutSeconds ?? defaultTimeoutSeconds) * 1000
  return nowMs - checkedHlcWallMs(s.lastSeenHlc) > timeout
}

/** Wall time of an HLC, as stored in `last_seen_at` columns. */
export function hlcTime(hlc: string): Date {
  return new Date(checkedHlcWallMs(hlc))
}

/**
 * `e` replaces the value last written by (hlc, eventId): a later HLC, or the same HLC and a
 * greater event id. A value stored before event ids were kept (null id) loses a tie.
 */
function wins(e: DeviceEvent, hlc: string | null, eventId: string | null): boolean {
  return newer(e.hlc, hlc) || (e.hlc === hlc && (eventId === null || e.eventId > eventId))
}

/** `a` is later than `b` (or `b` is absent). Encoded HLCs compare as strings. */
function newer(a: string, b: string | null): boolean {
  return b === null || a > b
}
