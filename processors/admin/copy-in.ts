/**
 * One pooled connection as both a Kysely and a COPY sender, so that a rebuild's bulk batch sends
 * its rows by COPY in the same transaction as its other statements and its position.
 */
import { Kysely, PostgresDialect, type PostgresPoolClient } from 'kysely'
import type pg from 'pg'
import type { CopyIn, CopySend } from '../../projections/copy-rows.ts'
import type { Database } from '../../projections/tables.ts'
import { copyOn } from '../../infra/copy-connection.ts'

/**
 * Runs `fn` on one connection of `pool`: `db` runs every statement on it (a transaction begun
 * on `db` holds it), `copy` sends COPY payloads on it, and `copy.aside` on another connection of
 * the pool, each in a transaction of its own. The connection goes back to the pool after, or is
 * closed when `fn` failed (it may be mid-COPY).
 */
export async function onOneConnection<T>(
  pool: pg.Pool,
  fn: (db: Kysely<Database>, copy: CopyIn) => Promise<T>,
): Promise<T> {
  const client = await pool.connect()
  const shared: PostgresPoolClient = {
    query: client.query.bind(client),
    release: () => undefined,
  }
  const db = new Kysely<Database>({
    dialect: new PostgresDialect({
      pool: { connect: () => Promise.resolve(shared), end: () => Promise.resolve() },
    }),
  })
  const aside: CopySend = async (table, columns, payload) =>
    releasedAfter(await pool.connect(), (other) => copyOn(other, table, columns, payload))
  const copy: CopyIn = Object.assign(
    (table: string, columns: readonly string[], payload: string) =>
      copyOn(client, table, columns, payload),
    { aside },
  )
  try {
    return await releasedAfter(client, () => fn(db, copy))
  } finally {
    await db.destroy()
  }
}

/**
 * Runs `fn` on `client`, then gives it back to its pool; closes it instead when `fn` failed (it
 * may be mid-COPY).
 */
async function releasedAfter<T>(
  client: pg.PoolClient,
  fn: (client: pg.PoolClient) => Promise<T>,
): Promise<T> {
  try {
    const out = await fn(client)
    client.release()
    return out
  } catch (err) {
    client.release(err instanceof Error ? err : new Error(String(err)))
    throw err
  }
}
