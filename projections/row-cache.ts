import { sql, type Transaction } from 'kysely'
import type { Database } from './tables.ts'

/**
 * What a projection read back from its own rows in one batch, kept for the next batch, and
 * trusted only while the row it came from is still the version this process wrote.
 *
 * Why: the alerts processor read each batch's sensors, timelines, tips, conditions and open
 * alerts back from Postgres, though in the common case they were what its previous batch had just
 * written; parsing them was the largest part of its CPU after the fold itself.
 *
 * How it stays exact: each entry is tagged with the id of the transaction that wrote (or is
 * writing) the row it mirrors, as Postgres shows it in that row's `xmin`. A batch first reads the
 * `xmin` of its rows (a small query) and takes an entry only when the two agree. They agree only
 * if that transaction committed and no other wrote the row since: a rolled back batch, a retried
 * commit, a rewind, a rebuild, another instance that held the slot meanwhile, all leave another
 * `xmin` (or no row), and the entry is read again from Postgres. A row written under a savepoint
 * carries the savepoint's own id, never the tag: such entries are read again too. The one writer
 * the check cannot see is the tagging transaction itself, so whoever changes a row's content other
 * than through the cached value in that transaction (a clock tick silencing sensors) drops the
 * entry.
 *
 * `xmin` is 32 bits: a false match needs the same id to come round again (some 4 billion
 * transactions) while the entry sits unused, and is not guarded against.
 */
export class RowCache<V> {
  readonly #entries = new Map<string, { readonly xmin: string; readonly value: V }>()

  /** At most `capacity` entries; the least recently used go first. */
  constructor(private readonly capacity: number) {}

  /** The value kept for `key` if its row's `xmin` is still the one it was tagged with. */
  take(key: string, xmin: string): V | undefined {
    const e = this.#entries.get(key)
    if (e === undefined) return undefined
    this.#entries.delete(key)
    return e.xmin === xmin ? e.value : undefined
  }

  /** Keeps `value` as the content of the row `key` that transaction `xmin` wrote. */
  put(key: string, xmin: string, value: V): void {
    this.#entries.delete(key)
    this.#entries.set(key, { xmin, value })
    if (this.#entries.size > this.capacity) {
      const oldest = this.#entries.keys().next()
      if (oldest.done !== true) this.#entries.delete(oldest.value)
    }
  }

  drop(key: string): void {
    this.#entries.delete(key)
  }
}

const ids = new WeakMap<Transaction<Database>, Promise<string>>()

/** The id of `trx` as the `xmin` of the rows it writes shows it; asked once per transaction. */
export function transactionId(trx: Transaction<Database>): Promise<string> {
  let id = ids.get(trx)
  if (id === undefined) {
    id = sql<{ id: string }>`select pg_current_xact_id()::xid::text as id`
      .execute(trx)
      .then((r) => r.rows[0]?.id ?? '')
    ids.set(trx, id)
  }
  return id
}
