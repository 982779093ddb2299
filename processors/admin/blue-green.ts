/**
 * The blue/green tables of a rebuild: the scratch schema, its analysis, the live tables' lock,
 * the swap and the retired schema (used by processors/admin/rebuild-projection.ts).
 */
import { sql, type Kysely, type Transaction } from 'kysely'
import { lockCheckpoints, type CheckpointPosition } from '../progress/checkpoints.ts'
import { ownRows } from '../partitions.ts'
import type { AnyProjection } from '../../projections/projection.ts'
import type { Database } from '../../projections/tables.ts'
import { OperatorError } from '../../schemas/errors.ts'

/**
 * Blue/green tables for a projection rebuild: the new ("green") tables are built in a scratch
 * schema while the live ones keep serving, then swapped in by renaming, in one transaction.
 *
 * ```ts
 * await prepareScratch(db, 'readings', projection)      // rebuild_readings.readings, ... (empty)
 * // ... apply the stream into them through a connection with search_path = rebuild_readings ...
 * await trx... lockLive(trx, ['readings'], projection, 500) // waits for the live processor's batch
 * await swapIn(trx, 'readings', projection, retiredSchemaName('readings', new Date()))
 * ```
 */

/**
 * Tables several projections write, keyed by the projection's name in this column: one row
 * each, or one per partition (`<projection>-p<N>`). A rebuild swaps only its own rows of them,
 * never the table.
 */
export const SHARED_TABLES: Readonly<Partial<Record<keyof Database, string>>> = {
  projection_clocks: 'projection',
}

/** A rebuild that cannot be done safely on this database, with the reason. */
export class RebuildRefusedError extends OperatorError {}

/** `rebuild_<processor>`: where a rebuild writes (hyphens become underscores). */
export function scratchSchemaName(processor: string): string {
  return `rebuild_${token(processor)}`
}

/** `retired_<processor>_<yyyymmddhhmmss>`: where the replaced tables go, for inspection. */
export function retiredSchemaName(processor: string, at: Date): string {
  const stamp = at.toISOString().replace(/[-:T]/g, '').slice(0, 14)
  return `retired_${token(processor)}_${stamp}`
}

/** A table's name as `::regclass` reads it; both parts are names this module chose or validated. */
function regclass(schema: string, table: string): string {
  return `"${schema}"."${table}"`
}

function token(processor: string): string {
  if (!/^[a-z][a-z0-9-]{0,30}$/.test(processor)) {
    throw new RebuildRefusedError(
      `'processor' must match /^[a-z][a-z0-9-]{0,30}$/, got '${processor}'`,
    )
  }
  return processor.replaceAll('-', '_')
}

/** Every table a rebuild creates in its scratch schema: the projection's plus its checkpoint. */
function scratchTables(projection: AnyProjection): string[] {
  return [...projection.tables, 'processor_checkpoints']
}

/**
 * Drops a leftover scratch schema (from a crashed rebuild) and creates empty copies of the
 * projection's tables in a fresh one: `LIKE ... INCLUDING ALL` (columns, collations, defaults,
 * check constraints, indexes, partial unique indexes), with the live index and constraint names,
 * and the live tables' grants, so that after the swap nothing an operator or a later migration
 * relies on has changed. One transaction: it exists completely or not at all.
 *
 * Refused, before anything is created, when a swap could not be complete: views over the live
 * tables (they would keep reading the retired tables) or serial columns (the copy would share the
 * live table's sequence).
 */
export async function prepareScratch(
  db: Kysely<Database>,
  processor: string,
  projection: AnyProjection,
): Promise<string> {
  const scratch = scratchSchemaName(processor)
  await refuseUnsafeTables(db, projection)
  await db.transaction().execute(async (trx) => {
    await sql`drop schema if exists ${sql.id(scratch)} cascade`.execute(trx)
    await sql`create schema ${sql.id(scratch)}`.execute(trx)
    for (const table of scratchTables(projection)) {
      await sql`create table ${sql.id(scratch, table)} (like ${sql.id('public', table)} including all)`.execute(
        trx,
      )
      await renameIndexesLikeLive(trx, scratch, table)
      await copyStorageParameters(trx, scratch, table)
      await copyGrants(trx, scratch, table)
    }
  })
  return scratch
}

/** Drops the scratch schema of a rebuild, if there is one. */
export async function discardScratch(db: Kysely<Database>, processor: string): Promise<void> {
  await sql`drop schema if exists ${sql.id(scratchSchemaName(processor))} cascade`.execute(db)
}

/**
 * Drops the scratch tables' non-unique indexes and returns the statements that create them again
 * ({@link restoreIndexes}): the bulk of a rebuild goes into empty tables, where one sort per index
 * at the end costs less than keeping each index in order row by row (the readings index by sensor
 * and time was most of the write). Unique indexes stay: upserts and constraints rely on them.
 * A rebuild that dies before restoring them leaves only its scratch schema, which the next drops.
 */
export async function deferIndexes(
  db: Kysely<Database>,
  processor: string,
  projection: AnyProjection,
): Promise<string[]> {
  const scratch = scratchSchemaName(processor)
  const indexes = await sql<{ name: string; def: string }>`
    select c.relname as name, pg_get_indexdef(i.indexrelid) as def
    from pg_index i join pg_class c on c.oid = i.indexrelid
    where i.indrelid = any(${projection.tables.map((t) => regclass(scratch, t))}::regclass[])
      and not i.indisunique
    order by c.relname`.execute(db)
  for (const i of indexes.rows) await sql`drop index ${sql.id(scratch, i.name)}`.execute(db)
  return indexes.rows.map((i) => i.def)
}

/**
 * Creates the indexes {@link deferIndexes} dropped, each in one sort (with room to sort in memory)
 * and its own transaction: it holds one table's lock at a time, so it may run beside a
 * transaction that writes the scratch tables (a bulk load's `finish`) without a deadlock; each
 * waits for the other at most once.
 */
export async function restoreIndexes(db: Kysely<Database>, defs: readonly string[]): Promise<void> {
  for (const def of defs) {
    await db.transaction().execute(async (trx) => {
      await sql`select set_config('maintenance_work_mem', '256MB', true)`.execute(trx)
      await sql.raw(def).execute(trx)
    })
  }
}

/** Refreshes the planner's statistics of the scratch tables, so the swapped-in tables plan well at once. */
export async function analyzeScratch(
  db: Kysely<Database>,
  processor: string,
  projection: AnyProjection,
): Promise<void> {
  const scratch = scratchSchemaName(processor)
  for (const table of projection.tables) await sql`analyze ${sql.id(scratch, table)}`.execute(db)
}

async function refuseUnsafeTables(db: Kysely<Database>, projection: AnyProjection): Promise<void> {
  const problems: string[] = []
  for (const table of scratchTables(projection)) {
    const views = await sql<{ view: string }>`
      select distinct v.oid::regclass::text as view
      from pg_depend d
      join pg_rewrite r on r.oid = d.objid
      join pg_class v on v.oid = r.ev_class
      where d.classid = 'pg_rewrite'::regclass and d.refobjid = ${regclass('public', table)}::regclass
        and v.oid <> d.refobjid
      order by 1`.execute(db)
    for (const v of views.rows) {
      problems.push(
        `view ${v.view} reads table '${table}': after a swap it would keep reading the retired table; drop it and create it again after the rebuild`,
      )
    }
    const serials = await sql<{ column: string }>`
      select a.attname as column from pg_attrdef d
      join pg_attribute a on a.attrelid = d.adrelid and a.attnum = d.adnum
      where d.adrelid = ${regclass('public', table)}::regclass
        and pg_get_expr(d.adbin, d.adrelid) like 'nextval(%'`.execute(db)
    for (const s of serials.rows) {
      problems.push(
        `column '${table}.${s.column}' takes its default from a sequence: the copy would share it with the live table`,
      )
    }
  }
  if (problems.length > 0) {
    throw new RebuildRefusedError(`cannot rebuild '${projection.name}': ${problems.join('; ')}`)
  }
}

/**
 * `LIKE ... INCLUDING INDEXES` names the copies itself (`readings_pkey`, `..._idx1`); give each
 * the name of the live index with the same definition (renaming a constraint's index renames the
 * constraint too).
 */
async function renameIndexesLikeLive(
  trx: Transaction<Database>,
  scratch: string,
  table: string,
): Promise<void> {
  const indexes = async (schema: string) =>
    (
      await sql<{ name: string; def: string }>`
        select c.relname as name, pg_get_indexdef(i.indexrelid) as def
        from pg_index i join pg_class c on c.oid = i.indexrelid
        where i.indrelid = ${regclass(schema, table)}::regclass
        order by c.relname`.execute(trx)
    ).rows.map((r) => ({ name: r.name, shape: indexShape(r.def) }))
  const live = await indexes('public')
  const copies = await indexes(scratch)
  // Two passes: a copy may already carry a name another live index has.
  const renames: { from: string; to: string }[] = []
  for (const copy of copies) {
    const twin = live.findIndex((l) => l.shape === copy.shape)
    const name = live[twin]?.name
    if (name === undefined) throw new Error(`no live index of '${table}' matches ${copy.shape}`)
    live.splice(twin, 1)
    if (name !== copy.name) renames.push({ from: copy.name, to: name })
  }
  for (const [i, r] of renames.entries()) {
    await sql`alter index ${sql.id(scratch, r.from)} rename to ${sql.id(`fleetstream_tmp_${i}`)}`.execute(
      trx,
    )
  }
  for (const [i, r] of renames.entries()) {
    await sql`alter index ${sql.id(scratch, `fleetstream_tmp_${i}`)} rename to ${sql.id(r.to)}`.execute(
      trx,
    )
  }
}

/** An index definition without its name and schema: `UNIQUE btree (device_id) WHERE ...`. */
function indexShape(def: string): string {
  return def.replace(/^CREATE (UNIQUE )?INDEX \S+ ON (ONLY )?\S+ /, (_m, unique?: string) =>
    unique ? 'UNIQUE ' : '',
  )
}

/**
 * The live table's storage parameters (`fillfactor`, an operator's `autovacuum_*`), set on the
 * copy: `like ... including all` copies none of them. Without this a rebuild dropped the fillfactor
 * of the rows every event rewrites (migrations 2026-12-03-01 and 2026-12-04-01), and their updates
 * stopped being HOT from the swap on.
 */
async function copyStorageParameters(
  trx: Transaction<Database>,
  scratch: string,
  table: string,
): Promise<void> {
  const { rows } = await sql<{ name: string; value: string }>`
    select o.option_name as name, o.option_value as value
    from pg_class c, pg_options_to_table(c.reloptions) o
    where c.oid = ${regclass('public', table)}::regclass`.execute(trx)
  if (rows.length === 0) return
  const set = rows.map((o) => sql`${sql.id(o.name)} = ${sql.lit(o.value)}`)
  await sql`alter table ${sql.id(scratch, table)} set (${sql.join(set)})`.execute(trx)
}

/** Grants on the live table, repeated on the copy (readers keep their access after the swap). */
async function copyGrants(
  trx: Transaction<Database>,
  scratch: string,
  table: string,
): Promise<void> {
  const grants = await sql<{ grantee: string | null; privilege: string; grantable: boolean }>`
    select case when a.grantee = 0 then null else pg_get_userbyid(a.grantee) end as grantee,
           a.privilege_type as privilege, a.is_grantable as grantable
    from pg_class c, aclexplode(c.relacl) a
    where c.oid = ${regclass('public', table)}::regclass and a.grantee <> c.relowner`.execute(trx)
  for (const g of grants.rows) {
    if (!/^[A-Z ]+$/.test(g.privilege)) continue
    await sql`grant ${sql.raw(g.privilege)} on ${sql.id(scratch, table)} to ${g.grantee === null ? sql.raw('public') : sql.id(g.grantee)}${sql.raw(g.grantable ? ' with grant option' : '')}`.execute(
      trx,
    )
  }
}

/**
 * Inside the swap transaction: takes the live tables (ACCESS EXCLUSIVE, which waits for the live
 * processor's batch in flight and holds off its next one; shared tables EXCLUSIVE, which still
 * lets them be read), then reads the live checkpoint of each slot (the processor's, or each of
 * its partitions') as committed. Waits at most `lockTimeoutMs`
 * for each lock (then fails with SQLSTATE 55P03): below the server's deadlock timeout, so when
 * the live processor's batch holds one table and wants another, the swap is the one that gives up.
 */
export async function lockLive(
  trx: Transaction<Database>,
  slots: readonly string[],
  projection: AnyProjection,
  lockTimeoutMs: number,
): Promise<Map<string, CheckpointPosition>> {
  await sql`select set_config('lock_timeout', ${`${Math.max(1, Math.round(lockTimeoutMs))}ms`}, true)`.execute(
    trx,
  )
  const own = projection.tables.filter((t) => SHARED_TABLES[t] === undefined)
  const shared = projection.tables.filter((t) => SHARED_TABLES[t] !== undefined)
  if (own.length > 0) {
    await sql`lock table ${sql.join(own.map((t) => sql.id('public', t)))} in access exclusive mode`.execute(
      trx,
    )
  }
  if (shared.length > 0) {
    await sql`lock table ${sql.join(shared.map((t) => sql.id('public', t)))} in exclusive mode`.execute(
      trx,
    )
  }
  // A batch that changed no table (all refused, say) moves only the checkpoint: wait for it too.
  return lockCheckpoints(trx, slots)
}

/**
 * Inside the swap transaction, after {@link lockLive} and once the scratch tables hold exactly
 * the live checkpoint: moves the live tables into `retired` and the scratch tables into `public`
 * (indexes, constraints and grants go with them), swaps the projection's own rows of shared
 * tables (the replaced rows are kept in `retired` too), and drops the scratch schema. Statements
 * of other sessions waiting on the locks resolve the table names again when they get them, so
 * the live processor's next batch and every waiting query land in the new tables.
 *
 * Notifications the live run already published are marked published in the new outbox, so the
 * relay does not even look them up; any other row goes through the relay's own check against
 * FLEET_NOTIFICATIONS, which never sends one twice.
 */
export async function swapIn(
  trx: Transaction<Database>,
  processor: string,
  projection: AnyProjection,
  retired: string,
): Promise<void> {
  const scratch = scratchSchemaName(processor)
  if (projection.tables.includes('notification_outbox')) {
    await sql`
      update ${sql.id(scratch, 'notification_outbox')} n set published_at = l.published_at
      from public.notification_outbox l
      where l.notification_id = n.notification_id and l.published_at is not null
        and n.published_at is null`.execute(trx)
  }
  await sql`create schema ${sql.id(retired)}`.execute(trx)
  for (const table of projection.tables) {
    const key = SHARED_TABLES[table]
    if (key === undefined) {
      await sql`alter table ${sql.id('public', table)} set schema ${sql.id(retired)}`.execute(trx)
      await sql`alter table ${sql.id(scratch, table)} set schema public`.execute(trx)
      continue
    }
    const own = ownRows(key, projection.name)
    await sql`create table ${sql.id(retired, table)} as
      select * from ${sql.id('public', table)} where ${own}`.execute(trx)
    await sql`delete from ${sql.id('public', table)} where ${own}`.execute(trx)
    await sql`insert into ${sql.id('public', table)}
      select * from ${sql.id(scratch, table)} where ${own}`.execute(trx)
  }
  await sql`drop schema ${sql.id(scratch)} cascade`.execute(trx)
}

/** Drops a schema of retired tables. */
export async function dropRetired(db: Kysely<Database>, retired: string): Promise<void> {
  if (!/^retired_[a-z0-9_]+$/.test(retired)) {
    throw new RebuildRefusedError(`'retired' must match /^retired_[a-z0-9_]+$/, got '${retired}'`)
  }
  await sql`drop schema if exists ${sql.id(retired)} cascade`.execute(db)
}
