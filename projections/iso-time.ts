/**
 * `d.toISOString()` for a timestamp that goes into a batch's rows (projections/json-rows.ts,
 * projections/copy-rows.ts).
 *
 * Why a string, not the Date: one Date in a row sends `JSON.stringify` down its slow path for that
 * row (an 11-column readings row, 1,000 rows a batch: 4.2 us per row with `ingested_at` a Date,
 * 2.9 with it converted first, 1.8 with a string already there; node 20). Why the last one is
 * kept: a stream's timestamps come in order and in bursts, many events to a millisecond (tens
 * when a backlog was published at tens of thousands a second), so most conversions are free.
 */
export function isoTime(d: Date): string {
  const ms = d.getTime()
  if (ms !== last.ms) {
    last.iso = d.toISOString()
    last.ms = ms
  }
  return last.iso
}

const last = { ms: Number.NaN, iso: '' }
