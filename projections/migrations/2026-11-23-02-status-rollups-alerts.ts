import { sql, type Kysely } from 'kysely'

// Frozen in time: never edit a migration that has shipped; add a new one.

const hlc = sql`text collate "C"`

/** sensor_status and alert_sensors share this shape (one tracker writes both). */
async function createSensorStateTable(db: Kysely<any>, name: string): Promise<void> {
  await db.schema
    .createTable(name)
    .addColumn('device_id', 'text', (c) => c.primaryKey())
    .addColumn('status', 'text', (c) =>
      c
        .notNull()
        .check(sql`status in ('active', 'inactive', 'maintenance', 'decommissioned', 'unknown')`),
    )
    .addColumn('status_hlc', hlc, (c) => c.notNull())
    .addColumn('status_event_id', 'text', (c) => c.notNull())
    .addColumn('status_correlation_id', 'text', (c) => c.notNull())
    .addColumn('status_changed_at', 'timestamptz', (c) => c.notNull())
    .addColumn('last_seen_at', 'timestamptz', (c) => c.notNull())
    .addColumn('last_seen_hlc', hlc, (c) => c.notNull())
    .addColumn('last_seen_event_id', 'text', (c) => c.notNull())
    .addColumn('site', 'text')
    .addColumn('model', 'text')
    .addColumn('firmware', 'text')
    .addColumn('inactivity_timeout_seconds', 'integer')
    .addColumn('registered_hlc', hlc)
    .addColumn('decommissioned_hlc', hlc)
    .addColumn('declared_status', 'text')
    .addColumn('declared_hlc', hlc)
    .execute()
  // The silence sweep on every tick looks for active sensors by last seen time.
  await db.schema
    .createIndex(`${name}_active_last_seen`)
    .on(name)
    .column('last_seen_at')
    .where(sql.ref('status'), '=', 'active')
    .execute()
}

export async function up(db: Kysely<any>): Promise<void> {
  // readings: per-minute rollups, and the index for "a site's hourly averages" over a time range.
  await db.schema
    .createTable('readings_per_minute')
    .addColumn('device_id', 'text', (c) => c.notNull())
    .addColumn('metric', 'text', (c) => c.notNull())
    .addColumn('minute', 'timestamptz', (c) => c.notNull())
    .addColumn('count', 'bigint', (c) => c.notNull())
    .addColumn('min', 'double precision', (c) => c.notNull())
    .addColumn('max', 'double precision', (c) => c.notNull())
    // numeric, not float: an exact sum does not depend on how events were batched, so a
    // rebuild gives the same rows as the live run.
    .addColumn('sum', 'numeric', (c) => c.notNull())
    .addPrimaryKeyConstraint('readings_per_minute_pk', ['device_id', 'metric', 'minute'])
    .execute()
  await db.schema
    .createIndex('readings_per_minute_metric_minute')
    .on('readings_per_minute')
    .columns(['metric', 'minute'])
    .execute()

  // sensor-status
  await createSensorStateTable(db, 'sensor_status')
  await db.schema
    .createIndex('sensor_status_site')
    .on('sensor_status')
    .columns(['site', 'status'])
    .execute()
  await db.schema
    .createTable('sensor_status_history')
    .addColumn('device_id', 'text', (c) => c.notNull())
    .addColumn('event_id', 'text', (c) => c.notNull())
    .addColumn('stream_seq', 'bigint', (c) => c.notNull())
    .addColumn('from_status', 'text')
    .addColumn('to_status', 'text', (c) => c.notNull())
    .addColumn('hlc', hlc, (c) => c.notNull())
    .addColumn('changed_at', 'timestamptz', (c) => c.notNull())
    .addColumn('correlation_id', 'text', (c) => c.notNull())
    .addColumn('causation_id', 'text')
    .addColumn('reason', 'text', (c) => c.notNull())
    .addPrimaryKeyConstraint('sensor_status_history_pk', ['device_id', 'event_id'])
    .execute()
  await db.schema
    .createIndex('sensor_status_history_time')
    .on('sensor_status_history')
    .columns(['device_id', 'hlc'])
    .execute()

  await db.schema
    .createTable('projection_clocks')
    .addColumn('projection', 'text', (c) => c.primaryKey())
    .addColumn('now_at', 'timestamptz', (c) => c.notNull())
    .addColumn('tick_event_id', 'text', (c) => c.notNull())
    .execute()

  // alerts
  await createSensorStateTable(db, 'alert_sensors')
  await db.schema
    .createTable('alerts')
    .addColumn('alert_id', 'text', (c) => c.primaryKey())
    .addColumn('device_id', 'text', (c) => c.notNull())
    .addColumn('rule_id', 'text', (c) => c.notNull())
    .addColumn('severity', 'text', (c) =>
      c.notNull().check(sql`severity in ('info', 'warning', 'critical')`),
    )
    .addColumn('state', 'text', (c) =>
      c.notNull().check(sql`state in ('open', 'acknowledged', 'resolved')`),
    )
    .addColumn('message', 'text', (c) => c.notNull())
    .addColumn('value', 'double precision')
    .addColumn('raised_at', 'timestamptz', (c) => c.notNull())
    .addColumn('raised_hlc', hlc, (c) => c.notNull())
    .addColumn('raised_event_id', 'text', (c) => c.notNull())
    .addColumn('correlation_id', 'text', (c) => c.notNull())
    .addColumn('acknowledged_at', 'timestamptz')
    .addColumn('acknowledged_hlc', hlc)
    .addColumn('acknowledged_by', 'text')
    .addColumn('acknowledged_event_id', 'text')
    .addColumn('resolved_at', 'timestamptz')
    .addColumn('resolved_hlc', hlc)
    .addColumn('resolved_event_id', 'text')
    .addColumn('occurrences', 'integer', (c) => c.notNull().check(sql`occurrences >= 1`))
    .addColumn('last_occurrence_event_id', 'text', (c) => c.notNull())
    .execute()
  // At most one alert per sensor and rule that is not resolved: enforced here, not only in code.
  await db.schema
    .createIndex('alerts_one_unresolved')
    .on('alerts')
    .columns(['device_id', 'rule_id'])
    .unique()
    .where(sql.ref('state'), '<>', 'resolved')
    .execute()
  await db.schema
    .createIndex('alerts_state_severity')
    .on('alerts')
    .columns(['state', 'severity', 'raised_at'])
    .execute()
  await db.schema
    .createTable('alert_conditions')
    .addColumn('device_id', 'text', (c) => c.notNull())
    .addColumn('rule_id', 'text', (c) => c.notNull())
    .addColumn('consecutive', 'integer', (c) => c.notNull())
    .addColumn('since_at', 'timestamptz')
    .addColumn('since_hlc', hlc)
    // Newest reading evaluated: older or repeated readings are not evaluated again (idempotency).
    .addColumn('last_hlc', hlc, (c) => c.notNull())
    .addPrimaryKeyConstraint('alert_conditions_pk', ['device_id', 'rule_id'])
    .execute()
  await db.schema
    .createTable('notification_outbox')
    .addColumn('notification_id', 'text', (c) => c.primaryKey())
    .addColumn('alert_id', 'text', (c) => c.notNull())
    .addColumn('kind', 'text', (c) => c.notNull().check(sql`kind in ('raised', 'resolved')`))
    .addColumn('subject', 'text', (c) => c.notNull())
    .addColumn('payload', 'jsonb', (c) => c.notNull())
    .addColumn('hlc', hlc, (c) => c.notNull())
    .addColumn('published_at', 'timestamptz')
    .execute()
  await db.schema
    .createIndex('notification_outbox_unpublished')
    .on('notification_outbox')
    .column('hlc')
    .where(sql.ref('published_at'), 'is', null)
    .execute()
}

export async function down(db: Kysely<any>): Promise<void> {
  for (const t of [
    'notification_outbox',
    'alert_conditions',
    'alerts',
    'alert_sensors',
    'projection_clocks',
    'sensor_status_history',
    'sensor_status',
    'readings_per_minute',
  ]) {
    await db.schema.dropTable(t).execute()
  }
}
