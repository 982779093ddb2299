import { sql, type Kysely } from 'kysely'

// Frozen in time: never edit a migration that has shipped; add a new one.

/**
 * `alert_conditions` holds the threshold rules that are in a breach (consecutive breaching
 * readings so far, and since when), no longer a row for every rule ever fed, and no longer the
 * newest reading each rule evaluated (`last_hlc`): that moved with every reading, so every rule a
 * reading fed had its row rewritten each batch, although the breach rarely changed (at 1M events:
 * ~10 us of Postgres per event). The alerts projection derives it from the rule's kept readings
 * and its horizon when it needs it (projections/alerts.ts).
 */
export async function up(db: Kysely<any>): Promise<void> {
  await sql`delete from alert_conditions where consecutive = 0`.execute(db)
  await db.schema.alterTable('alert_conditions').dropColumn('last_hlc').execute()
}

/**
 * Back to a column of the newest reading evaluated, derived as the projection does; the rows of
 * rules not in a breach are not brought back (the previous code writes them at their next reading).
 */
export async function down(db: Kysely<any>): Promise<void> {
  await sql`alter table alert_conditions add column last_hlc text collate "C"`.execute(db)
  await sql`
    update alert_conditions c set last_hlc = l.hlc
    from (select device_id, rule_id, max(hlc collate "C") as hlc
          from (select device_id, rule_id, hlc from alert_inputs where kind = 'reading'
                union all
                select device_id, rule_id, state -> 'condition' ->> 'lastHlc' from alert_horizons) n
          group by 1, 2) l
    where l.device_id = c.device_id and l.rule_id = c.rule_id`.execute(db)
  await sql`update alert_conditions set last_hlc = '' where last_hlc is null`.execute(db)
  await sql`alter table alert_conditions alter column last_hlc set not null`.execute(db)
}
