import { type Kysely } from 'kysely'

// Frozen in time: never edit a migration that has shipped; add a new one.

/**
 * The partition of FLEET_EVENTS a sensor's events arrive on (null: a stream that is not
 * partitioned). A clock tick in partition P moves stream time for the sensors of P only, so
 * partitions processed at different speeds (or by different instances) never judge each
 * other's sensors silent.
 */
export async function up(db: Kysely<any>): Promise<void> {
  for (const table of ['sensor_status', 'alert_sensors']) {
    await db.schema.alterTable(table).addColumn('partition', 'smallint').execute()
  }
}

export async function down(db: Kysely<any>): Promise<void> {
  for (const table of ['sensor_status', 'alert_sensors']) {
    await db.schema.alterTable(table).dropColumn('partition').execute()
  }
}
