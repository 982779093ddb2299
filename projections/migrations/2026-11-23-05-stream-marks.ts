import { sql, type Kysely } from 'kysely'

// Frozen in time: never edit a migration that has shipped; add a new one.

/**
 * What each commit of a processor read from FLEET_EVENTS: its range of sequences, how many of the
 * processor's messages were in it, a digest of them and one of its last message. A processor compares them with the
 * stream after a failover and goes back to where they still agree (processors/progress/stream-marks.ts).
 * Pruned as they age.
 */
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema
    .createTable('processor_stream_marks')
    .addColumn('processor', 'text', (c) => c.notNull())
    .addColumn('from_seq', 'bigint', (c) => c.notNull())
    .addColumn('last_seq', 'bigint', (c) => c.notNull())
    .addColumn('messages', 'integer', (c) => c.notNull())
    .addColumn('digest', 'text', (c) => c.notNull())
    .addColumn('last_digest', 'text', (c) => c.notNull())
    .addColumn('committed_at', 'timestamptz', (c) => c.notNull().defaultTo(sql`now()`))
    .addPrimaryKeyConstraint('processor_stream_marks_pkey', ['processor', 'last_seq'])
    .execute()
  await db.schema
    .createIndex('processor_stream_marks_committed')
    .on('processor_stream_marks')
    .columns(['processor', 'committed_at'])
    .execute()
}

export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.dropTable('processor_stream_marks').execute()
}
