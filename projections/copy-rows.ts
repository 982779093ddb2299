/**
 * Many rows as one COPY payload (text format): a rebuild's bulk load into empty tables, and the
 * rows a live commit only inserts (the alerts' inputs).
 *
 * Why: Postgres reads a COPY row with no per-row plan, no JSON parse and no parameter binding.
 * Measured on this machine (the readings table, its primary key only): COPY ~9 us per row of
 * Postgres CPU, `insert ... select from json_populate_recordset` ~16-20, an insert of the same
 * rows from another table ~10.
 */

import { sql, type Transaction } from 'kysely'
import { isoTime } from './iso-time.ts'
import type { Database } from './tables.ts'

/** Sends a COPY payload (text format) into `table` (`columns` in the payload's order). */
export type CopySend = (table: string, columns: readonly string[], payload: string) => Promise<void>

/** A COPY sender in the caller's transaction, and one beside it. */
export interface CopyIn extends CopySend {
  /**
   * The same on another connection, committed on its own: for rows nothing in the transaction
   * reads back, sent while it goes on (Postgres stores them while the caller works on). Only for
   * a rebuild's bulk phase, which is all or nothing: when it fails, its scratch schema is dropped
   * with whatever was sent aside.
   */
  readonly aside: CopySend
}

/** What a COPY field may hold: text, a number, a timestamp, or null. */
export type CopyValue = string | number | Date | null

/** A value as COPY's text format reads it: null is `\N`; backslash, tab, newline and CR escaped. */
export function copyField(v: CopyValue): string {
  if (v === null) return '\\N'
  // A number or a timestamp never holds a character to escape.
  if (typeof v === 'number') return String(v)
  if (v instanceof Date) return isoTime(v)
  return SPECIAL.test(v) ? v.replace(SPECIAL_ALL, (c) => ESCAPES[c] ?? c) : v
}

const SPECIAL = /[\\\t\n\r]/
const SPECIAL_ALL = /[\\\t\n\r]/g
const ESCAPES: Readonly<Record<string, string>> = {
  '\\': '\\\\',
  '\t': '\\t',
  '\n': '\\n',
  '\r': '\\r',
}

/**
 * The COPY text of `rows`, `columns` of each in the order the COPY names them.
 *
 * ```ts
 * await copy('readings', ['event_id', 'value'], copyText([{ event_id: 'e-1', value: 20.5 }], ['event_id', 'value']))
 * ```
 */
export function copyText<C extends string>(
  rows: readonly Readonly<Record<C, CopyValue>>[],
  columns: readonly C[],
): string {
  let out = ''
  for (const r of rows) {
    for (let i = 0; i < columns.length; i++) {
      const v = copyField(r[columns[i] as C])
      out += i === 0 ? v : `\t${v}`
    }
    out += '\n'
  }
  return out
}

/**
 * COPYs `payload` (COPY's text format: {@link copyText}, or {@link copyField} for each value;
 * at least one row) into `table`, in `trx`. COPY cannot skip a row whose key is there already
 * (an event stored before, re-published outside the dedup window): then it is rolled back to a
 * savepoint and `insertSkipping` inserts the rows, skipping the stored ones, so the first copy
 * stays, as in the live run.
 */
export async function copyPayload(
  trx: Transaction<Database>,
  copy: CopySend,
  table: string,
  columns: readonly string[],
  payload: string,
  insertSkipping: () => Promise<unknown>,
): Promise<void> {
  await sql`savepoint copy_rows`.execute(trx)
  try {
    await copy(table, columns, payload)
  } catch (err) {
    if ((err as { code?: unknown } | null)?.code !== UNIQUE_VIOLATION) throw err
    await sql`rollback to savepoint copy_rows; release savepoint copy_rows`.execute(trx)
    await insertSkipping()
    return
  }
  // What follows runs in the transaction itself again, not in the savepoint's subtransaction:
  // the rows it writes carry the transaction's id (projections/row-cache.ts checks it).
  await sql`release savepoint copy_rows`.execute(trx)
}

/** Postgres' unique_violation. */
const UNIQUE_VIOLATION = '23505'
