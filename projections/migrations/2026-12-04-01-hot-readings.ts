import { sql, type Kysely } from 'kysely'

// Frozen in time: never edit a migration that has shipped; add a new one.

/**
 * The readings rows that every reading rewrites are updated in place too, as heap-only tuples
 * (HOT), as 2026-12-03-01-hot-updates made the sensor rows: `latest_readings` (a sensor's newest
 * value per metric) and `readings_per_minute` (each sensor and metric's rollup of the current
 * minute, rewritten by every reading of that minute). Neither update changes an indexed column;
 * what kept most of them from being HOT was room: on a full page the new version of a row went to
 * another page, with a new index entry, and the table grew. After 300k readings from 10,000
 * sensors: `latest_readings` 13% of its updates HOT and 6,215 pages for 10,000 rows, now 100% and
 * 477; `readings_per_minute` 23% and 2,766 pages, now 99.9% and 246 (a fillfactor of 80 gave it
 * 91% and 526 pages: a batch rewrites many rows of the same recent pages at once, and each needs
 * room for its new version before the old ones can be pruned).
 *
 * Half of each page is left free. For `readings_per_minute`, which grows by a row per sensor and
 * metric every minute, that doubles its size on disk: it holds a row per minute where `readings`
 * holds every reading, so it stays a fraction of it. Pages written before this migration stay
 * full; a row on one moves, at its next update, to a page that leaves the room (Postgres honours
 * the fillfactor for the new version of a row too), so the tables converge without a rewrite.
 */
const TABLES = ['latest_readings', 'readings_per_minute']

export async function up(db: Kysely<any>): Promise<void> {
  for (const table of TABLES) {
    await sql`alter table ${sql.table(table)} set (fillfactor = 50)`.execute(db)
  }
}

export async function down(db: Kysely<any>): Promise<void> {
  for (const table of TABLES) {
    await sql`alter table ${sql.table(table)} reset (fillfactor)`.execute(db)
  }
}
