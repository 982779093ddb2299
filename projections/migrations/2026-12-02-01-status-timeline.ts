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
}

export async function down(db: Kysely<any>): Promise<void> {
  for (const table of ['sensor_status_timeline', 'alert_sensors_timeline']) {
    await db.schema.dropTable(table).execute()
  }
}
