import { type Kysely } from 'kysely'

// Frozen in time: never edit a migration that has shipped; add a new one.

/**
 * The event ids of the winning registration and declared status. Last-writer-wins is decided by
 * (HLC, event id): two distinct events can carry the same HLC (two gateways configured with one
 * node name, a device replaying with fresh ids), and without the id the winner would be whichever
 * arrived last, so a rebuild could disagree with the live table.
 */
export async function up(db: Kysely<any>): Promise<void> {
  for (const table of ['sensor_status', 'alert_sensors']) {
    await db.schema
      .alterTable(table)
      .addColumn('registered_event_id', 'text')
      .addColumn('declared_event_id', 'text')
      .execute()
  }
}

export async function down(db: Kysely<any>): Promise<void> {
  for (const table of ['sensor_status', 'alert_sensors']) {
    await db.schema
      .alterTable(table)
      .dropColumn('registered_event_id')
      .dropColumn('declared_event_id')
      .execute()
  }
}
