/** `events tail`'s one line per event. */
import type { ShownEvent } from './stored-events.ts'
import { fit, printable } from './terminal.ts'

/**
 * One event on one line, for `events tail` (its `--verbose` shows {@link formatEvent}'s block):
 * stream sequence, time stored (UTC), device, type and the data as `key=value` pairs; an event
 * that does not decode shows its subject and why. Cut to `width` columns when given (a
 * terminal); whole otherwise, for grep.
 *
 * ```txt
 *    412  2026-11-23 10:00:00.130  sensor-7  reading.recorded  metric=temperature value=21.5 unit=C
 *    413  2026-11-23 10:00:00.131  fleet.events.dev-b.reading  undecodable invalid-json: body is not JSON
 * ```
 */
export function formatEventLine(e: ShownEvent, width?: number): string {
  const at = e.storedAt.slice(0, 23).replace('T', ' ')
  const what = e.ok
    ? `${e.event.deviceId}  ${e.event.type}  ${pairs(e.event.data)}`
    : `${e.subject}  undecodable ${e.reason}: ${e.detail}`
  return fit(printable(`${String(e.seq).padStart(6)}  ${at}  ${what}`), width)
}

/** `metric=temperature value=21.5 unit=C`: top-level fields, nested values as JSON. */
function pairs(data: unknown): string {
  if (data === null || typeof data !== 'object' || Array.isArray(data)) return JSON.stringify(data)
  return Object.entries(data)
    .map(([k, v]) => `${k}=${typeof v === 'string' && !/\s/.test(v) ? v : JSON.stringify(v)}`)
    .join(' ')
}
