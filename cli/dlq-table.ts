/** `dlq list` as a table that fits the terminal, each column cut so no value pushes the rest. */
import type { DeadLetterEntry } from '../processors/dlq/inspect.ts'
import { cell, fit, printable, widthOf } from './terminal.ts'

/** Widest a column gets before its values are cut (a hostile subject or reason cannot push the rest). */
const MAX = { processor: 16, reason: 24, origin: 48 } as const
/** Detail is cut here when there is no terminal width to fit. */
const DETAIL_WITHOUT_WIDTH = 100
const DETAIL_AT_LEAST = 12
const SEPARATOR = '  '

/**
 * `dlq list`'s entries as aligned columns under a header, each row cut to `width` columns when
 * given (a terminal): the detail takes what is left.
 *
 * ```txt
 * SEQ  PARKED (UTC)         PROCESSOR  REASON          ORIGIN                          DETAIL
 *   7  2026-11-23 10:00:00  readings   handler-failed  fleet.events.dev-a.reading #12  RangeError: 666 i…
 * ```
 */
export function formatDlqTable(entries: readonly DeadLetterEntry[], width?: number): string[] {
  const rows = entries.map((e) => ({
    seq: String(e.seq),
    parked: e.parkedAt.slice(0, 19).replace('T', ' '),
    processor: printable(e.processor),
    reason: printable(e.reason),
    origin: printable(`${e.subject} #${e.streamSeq}`),
    detail: printable(e.detail),
  }))
  const head = {
    seq: 'SEQ',
    parked: 'PARKED (UTC)',
    processor: 'PROCESSOR',
    reason: 'REASON',
    origin: 'ORIGIN',
    detail: 'DETAIL',
  }
  const widest = (k: keyof typeof head, max = Infinity) =>
    Math.min(max, Math.max(widthOf(head[k]), ...rows.map((r) => widthOf(r[k]))))
  const w = {
    seq: widest('seq'),
    parked: widest('parked'),
    processor: widest('processor', MAX.processor),
    reason: widest('reason', MAX.reason),
    origin: widest('origin', MAX.origin),
  }
  if (width !== undefined) {
    // On a narrow terminal the origin gives way down to 12 columns, so that at least 12 are left
    // for the detail (whole in `dlq show`).
    const others = w.seq + w.parked + w.processor + w.reason + 5 * SEPARATOR.length
    w.origin = Math.max(12, Math.min(w.origin, width - others - DETAIL_AT_LEAST))
  }
  const line = (r: typeof head) =>
    fit(
      [
        r.seq.padStart(w.seq),
        cell(r.parked, w.parked),
        cell(r.processor, w.processor),
        cell(r.reason, w.reason),
        cell(r.origin, w.origin),
        width === undefined ? fit(r.detail, DETAIL_WITHOUT_WIDTH) : r.detail,
      ].join(SEPARATOR),
      width,
    )
  return [line(head), ...rows.map(line)]
}
