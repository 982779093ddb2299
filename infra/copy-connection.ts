/**
 * A Kysely connection over one pooled pg client that also sends COPY payloads on it, in whatever
 * transaction the client is in: a processor's commit stores rows by COPY beside its other
 * statements (processors/progress/slot-fence.ts), and a rebuild's bulk batch does
 * (processors/admin/copy-in.ts).
 */
import { CompiledQuery, type DatabaseConnection, type QueryResult, type Transaction } from 'kysely'
import type pg from 'pg'
import { from as copyFrom } from 'pg-copy-streams'
import { Readable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import type { CopySend } from '../projections/copy-rows.ts'

export class CopyConnection implements DatabaseConnection {
  readonly #client: pg.PoolClient
  /** COPYs a payload (text format) into a table on this connection. */
  readonly copy: CopySend

  constructor(client: pg.PoolClient) {
    this.#client = client
    this.copy = (table, columns, payload) => copyOn(client, table, columns, payload)
  }

  /** As Kysely's own Postgres connection runs a query. */
  async executeQuery<R>(compiledQuery: CompiledQuery): Promise<QueryResult<R>> {
    const { command, rowCount, rows } = await this.#client.query(compiledQuery.sql, [
      ...compiledQuery.parameters,
    ])
    const changed =
      command === 'INSERT' || command === 'UPDATE' || command === 'DELETE' || command === 'MERGE'
    return {
      ...(changed ? { numAffectedRows: BigInt(rowCount ?? 0) } : {}),
      rows: rows as R[],
    }
  }

  /** No cursor: nothing that runs on this connection streams a query. */
  streamQuery<R>(): AsyncIterableIterator<QueryResult<R>> {
    throw new Error('streaming queries need a cursor, which this connection does not have')
  }

  /** Back to the pool, as Kysely's own Postgres connection goes. */
  release(): void {
    this.#client.release()
  }
}

/**
 * The COPY sender of the connection `trx` runs on, if it can COPY (a transaction of a database
 * whose driver hands out {@link CopyConnection}s).
 */
export async function copyOf<DB>(trx: Transaction<DB>): Promise<CopySend | undefined> {
  const connection = await trx.getExecutor().provideConnection((c) => Promise.resolve(c))
  return connection instanceof CopyConnection ? connection.copy : undefined
}

/** Sends `payload` (COPY's text format, `columns` in order) into `table` on `client`. */
export async function copyOn(
  client: pg.PoolClient,
  table: string,
  columns: readonly string[],
  payload: string,
): Promise<void> {
  const quoted = columns.map((c) => `"${c.replaceAll('"', '""')}"`).join(', ')
  const into = `"${table.replaceAll('"', '""')}"`
  await pipeline(
    Readable.from([payload]),
    client.query(copyFrom(`copy ${into} (${quoted}) from stdin`)),
  )
}
