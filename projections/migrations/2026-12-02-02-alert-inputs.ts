import { sql, type Kysely } from 'kysely'

// Frozen in time: never edit a migration that has shipped; add a new one.

const hlc = sql`text collate "C"`

/**
 * What alerts are folded from, so that they do not depend on the order events arrived in:
 *
 * - `alert_inputs`: per sensor, the readings (and battery heartbeats) each threshold rule is fed,
 *   and the acknowledgements (`rule_id` ''), each named by its event;
 * - `alert_horizons`: per sensor and rule, where its kept inputs begin and the rule's state there
 *   (condition and the alert then open), so that only a window of inputs is kept;
 * - `alert_tips`: per sensor, the newest input folded and a digest of the status history folded,
 *   so that events that arrive in order are folded on from the current rows alone;
 * - `notification_outbox.corrects`: a notification that corrects or retracts one already sent.
 *
 * Alerts and conditions that exist already are kept: each (sensor, rule) gets a horizon just after
 * its newest known event, with its current condition and unresolved alert as the state there.
 */
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema
    .createTable('alert_inputs')
    .addColumn('device_id', 'text', (c) => c.notNull())
    .addColumn('rule_id', 'text', (c) => c.notNull())
    .addColumn('event_id', 'text', (c) => c.notNull())
    .addColumn('kind', 'text', (c) => c.notNull().check(sql`kind in ('reading', 'ack')`))
    .addColumn('hlc', hlc, (c) => c.notNull())
    .addColumn('correlation_id', 'text', (c) => c.notNull())
    .addColumn('value', 'double precision')
    .addColumn('alert_id', 'text')
    .addColumn('acknowledged_by', 'text')
    .addPrimaryKeyConstraint('alert_inputs_pk', ['device_id', 'rule_id', 'event_id'])
    .execute()
  await db.schema
    .createTable('alert_horizons')
    .addColumn('device_id', 'text', (c) => c.notNull())
    .addColumn('rule_id', 'text', (c) => c.notNull())
    .addColumn('hlc', hlc, (c) => c.notNull())
    .addColumn('event_id', 'text', (c) => c.notNull())
    .addColumn('state', 'jsonb', (c) => c.notNull())
    .addPrimaryKeyConstraint('alert_horizons_pk', ['device_id', 'rule_id'])
    .execute()
  await db.schema
    .createTable('alert_tips')
    .addColumn('device_id', 'text', (c) => c.primaryKey())
    .addColumn('hlc', hlc, (c) => c.notNull())
    .addColumn('event_id', 'text', (c) => c.notNull())
    .addColumn('history', 'text', (c) => c.notNull())
    .addColumn('readings_since_prune', 'integer', (c) => c.notNull())
    .execute()
  await sql`alter table notification_outbox add column corrects text`.execute(db)
  await sql`alter table notification_outbox drop constraint notification_outbox_kind_check`.execute(
    db,
  )
  await sql`alter table notification_outbox add constraint notification_outbox_kind_check
    check (kind in ('raised', 'resolved', 'corrected', 'retracted'))`.execute(db)
  await sql`
    insert into alert_horizons (device_id, rule_id, hlc, event_id, state)
    select k.device_id, k.rule_id,
      greatest(c.last_hlc, (select max(greatest(a.raised_hlc, a.acknowledged_hlc, a.resolved_hlc))
                            from alerts a where a.device_id = k.device_id and a.rule_id = k.rule_id)),
      chr(65535),
      jsonb_build_object(
        'condition', jsonb_build_object('consecutive', coalesce(c.consecutive, 0),
          'sinceMs', (extract(epoch from c.since_at) * 1000)::bigint, 'sinceHlc', c.since_hlc,
          'lastHlc', coalesce(c.last_hlc, '')),
        'open', (select to_jsonb(a) from alerts a where a.device_id = k.device_id
                 and a.rule_id = k.rule_id and a.state <> 'resolved'))
    from (select device_id, rule_id from alert_conditions
          union select device_id, rule_id from alerts) k
    left join alert_conditions c on c.device_id = k.device_id and c.rule_id = k.rule_id`.execute(db)
}

export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.dropTable('alert_tips').execute()
  await db.schema.dropTable('alert_horizons').execute()
  await db.schema.dropTable('alert_inputs').execute()
  await sql`delete from notification_outbox where kind in ('corrected', 'retracted')`.execute(db)
  await sql`alter table notification_outbox drop constraint notification_outbox_kind_check`.execute(
    db,
  )
  await sql`alter table notification_outbox add constraint notification_outbox_kind_check
    check (kind in ('raised', 'resolved'))`.execute(db)
  await sql`alter table notification_outbox drop column corrects`.execute(db)
}
