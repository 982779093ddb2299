/**
 * A quiet Postgres cluster before each run of a phase that compares runs (the scale-out phase),
 * and before the latency phase, which measures the steady state: what the phases before left
 * behind must not be paid for by one run and not by the other, nor by the steady state.
 *
 * Measured on this project's 2-core VM (200k events, 4 partitions, runs one after the other in one
 * cluster): whichever run came second was the slower by 8-20%, whether it had one instance of each
 * processor or two (Postgres' CPU per event 120 -> 138-159 us): autovacuum of the first run's
 * tables and the checkpointer writing out its pages ran beside it. With the first run's database
 * dropped, a CHECKPOINT and no autovacuum worker left, the runs in the order 1, 2, 2, 1 took
 * 34.4, 39.1, 37.6 and 35.1 s: no order left, only what the second instance costs.
 */
import pg from 'pg'
import { setTimeout as sleep } from 'node:timers/promises'
import type { PgCluster } from '../testbed/postgres.ts'

/** How long to wait for autovacuum to finish before going on regardless. */
const AUTOVACUUM_WAIT_MS = 120_000

/**
 * Drops `databases` (nothing of them is left for autovacuum), writes out what was dirtied
 * (`CHECKPOINT`), then waits until no autovacuum worker runs, at most {@link AUTOVACUUM_WAIT_MS}.
 * Returns what was still running when it gave up waiting (empty when quiet).
 */
export async function quietPostgres(
  pgc: PgCluster,
  databases: readonly string[],
): Promise<string[]> {
  const client = new pg.Client({ connectionString: pgc.url() })
  await client.connect()
  try {
    for (const db of databases) {
      await client.query(`drop database if exists ${client.escapeIdentifier(db)} with (force)`)
    }
    await client.query('checkpoint')
    const until = Date.now() + AUTOVACUUM_WAIT_MS
    for (;;) {
      const { rows } = await client.query<{ what: string }>(
        `select coalesce(datname, '?') || ': ' || coalesce(query, '') as what
         from pg_stat_activity where backend_type = 'autovacuum worker'`,
      )
      if (rows.length === 0 || Date.now() >= until) return rows.map((r) => r.what)
      await sleep(200)
    }
  } finally {
    await client.end()
  }
}
