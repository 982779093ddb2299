import { sql, type Kysely } from 'kysely'

// Frozen in time: never edit a migration that has shipped; add a new one.

const hlc = sql`text collate "C"`

/**
 * What a sensor's status timeline is folded from, in HLC order, so that its history and the
 * event its current status names do not depend on the order events arrived in: every
 * registration and status change, the sensor's first sign of life, and each silence (a clock
 * tick that turned it unknown) with the earliest event that ended it. One table per owner of
 * sensor state (`sensor_status`, `alert_sensors`).
 */
export async function up(db: Kysely<any>): Promise<void> {
  for (const table of ['sensor_status_timeline', 'alert_sensors_timeline']) {
    await db.schema
      .createTable(table)
      .addColumn('device_id', 'text', (c) => c.notNull())
      .addColumn('event_id', 'text', (c) => c.notNull())
      .addColumn('kind', 'text', (c) =>
        c.notNull().check(sql`kind in ('registered', 'status', 'first', 'silent')`),
      )
      .addColumn('hlc', hlc, (c) => c.notNull())
      .addColumn('at', 'timestamptz', (c) => c.notNull())
      .addColumn('status', 'text')
      .addColumn('note', 'text')
      .addColumn('correlation_id', 'text', (c) => c.notNull())
      .addColumn('causation_id', 'text')
      .addColumn('stream_seq', 'bigint', (c) => c.notNull())
      .addColumn('again_event_id', 'text')
      .addColumn('again_hlc', hlc)
      .addColumn('again_correlation_id', 'text')
      .addColumn('again_causation_id', 'text')
      .addColumn('again_stream_seq', 'bigint')
      .addPrimaryKeyConstraint(`${table}_pk`, ['device_id', 'event_id'])
      .execute()
  }
  // Sensors that already have a history keep it: their timeline is read back from it (each row
  // names the event and the kind of change; a `seen again` row ends the silence before it).
  await sql`
    insert into sensor_status_timeline (device_id, event_id, kind, hlc, at, status, note,
      correlation_id, causation_id, stream_seq)
    select device_id, event_id,
      case when reason in ('registered', 're-registered') then 'registered'
           when reason like 'status changed to %' then 'status'
           when reason = 'silent' then 'silent'
           else 'first' end,
      hlc, changed_at,
      case when reason like 'status changed to %' then to_status end,
      case when reason like 'status changed to %: %' then substr(reason, strpos(reason, ': ') + 2) end,
      correlation_id, causation_id, stream_seq
    from sensor_status_history
    where reason in ('registered', 're-registered', 'silent', 'first seen')
       or reason like 'status changed to %'`.execute(db)
  await sql`
    update sensor_status_timeline t set again_event_id = a.event_id, again_hlc = a.hlc,
      again_correlation_id = a.correlation_id, again_causation_id = a.causation_id,
      again_stream_seq = a.stream_seq
    from (
      select h.*, (select s.event_id from sensor_status_history s
                   where s.device_id = h.device_id and s.reason = 'silent' and s.hlc < h.hlc
                   order by s.hlc desc limit 1) as silent_id
      from sensor_status_history h where h.reason = 'seen again'
    ) a
    where t.device_id = a.device_id and t.event_id = a.silent_id and t.kind = 'silent'`.execute(db)
}

export async function down(db: Kysely<any>): Promise<void> {
  for (const table of ['sensor_status_timeline', 'alert_sensors_timeline']) {
    await db.schema.dropTable(table).execute()
  }
}
