import { sql, type Kysely } from 'kysely'

// Frozen in time: never edit a migration that has shipped; add a new one.

export async function up(db: Kysely<any>): Promise<void> {
  await db.schema
    .createTable('processor_checkpoints')
    .addColumn('processor', 'text', (c) => c.primaryKey())
    .addColumn('stream', 'text', (c) => c.notNull())
    .addColumn('last_seq', 'bigint', (c) => c.notNull().check(sql`last_seq >= 0`))
    .addColumn('hlc', sql`text collate "C"`)
    .addColumn('updated_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .execute()

  await db.schema
    .createTable('readings')
    .addColumn('event_id', 'text', (c) => c.primaryKey())
    .addColumn('device_id', 'text', (c) => c.notNull())
    .addColumn('metric', 'text', (c) => c.notNull())
    .addColumn('value', 'double precision', (c) => c.notNull())
    .addColumn('unit', 'text', (c) => c.notNull())
    .addColumn('occurred_at', 'timestamptz', (c) => c.notNull())
    .addColumn('hlc', sql`text collate "C"`, (c) => c.notNull())
    .addColumn('correlation_id', 'text', (c) => c.notNull())
    .addColumn('causation_id', 'text')
    .addColumn('stream_seq', 'bigint', (c) => c.notNull())
    .addColumn('ingested_at', 'timestamptz', (c) => c.notNull())
    .execute()
  // A sensor's series over a time range.
  await db.schema
    .createIndex('readings_device_metric_time')
    .on('readings')
    .columns(['device_id', 'metric', 'occurred_at'])
    .execute()

  await db.schema
    .createTable('latest_readings')
    .addColumn('device_id', 'text', (c) => c.notNull())
    .addColumn('metric', 'text', (c) => c.notNull())
    .addColumn('value', 'double precision', (c) => c.notNull())
    .addColumn('unit', 'text', (c) => c.notNull())
    .addColumn('occurred_at', 'timestamptz', (c) => c.notNull())
    .addColumn('hlc', sql`text collate "C"`, (c) => c.notNull())
    .addColumn('event_id', 'text', (c) => c.notNull())
    .addColumn('correlation_id', 'text', (c) => c.notNull())
    .addColumn('stream_seq', 'bigint', (c) => c.notNull())
    .addPrimaryKeyConstraint('latest_readings_pk', ['device_id', 'metric'])
    .execute()
}

export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.dropTable('latest_readings').execute()
  await db.schema.dropTable('readings').execute()
  await db.schema.dropTable('processor_checkpoints').execute()
}
