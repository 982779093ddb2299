import { randomBytes } from 'node:crypto'
import { sql, type Kysely } from 'kysely'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { createKysely, createPool } from '../infra/database.ts'
import { createLogger } from '../infra/logger.ts'
import {
  lockLive,
  prepareScratch,
  RebuildRefusedError,
  retiredSchemaName,
  swapIn,
} from '../processors/admin/blue-green.ts'
import { migrateToLatest } from '../projections/migrate.ts'
import { anyEvents } from '../projections/projection.ts'
import { readingsProjection } from '../projections/readings.ts'
import { sensorStatusProjection } from '../projections/sensor-status.ts'
import type { Database } from '../projections/tables.ts'
import { freshDatabase } from './harness/test-servers.ts'

const readings = anyEvents(readingsProjection)
const sensorStatus = anyEvents(sensorStatusProjection({ defaultTimeoutSeconds: 30 }))

function readingRow(eventId: string, seq: number) {
  return {
    event_id: eventId,
    device_id: 'd-1',
    metric: 'temperature',
    value: seq,
    unit: 'C',
    occurred_at: new Date('2026-11-23T10:00:00Z'),
    hlc: `1795428000000-${String(seq).padStart(6, '0')}-gw`,
    correlation_id: eventId,
    causation_id: null,
    stream_seq: seq,
    ingested_at: new Date('2026-11-23T10:00:00Z'),
  }
}

describe('blue/green tables', () => {
  let url: string
  let pool: pg.Pool
  let db: Kysely<Database>
  beforeAll(async () => {
    url = await freshDatabase()
    pool = createPool(url, { log: createLogger({ level: 'silent', name: 'test' }) })
    db = createKysely<Database>(pool)
    await migrateToLatest(db as Kysely<unknown>)
  })
  afterAll(async () => {
    await db.destroy()
  })

  const shape = async (schema: string, table: string) => {
    const r = await pool.query<{ name: string; def: string }>(
      `select indexname as name, regexp_replace(indexdef, ' ON \\S+ ', ' ON t ') as def
       from pg_indexes where schemaname = $1 and tablename = $2
       union all
       select conname, pg_get_constraintdef(oid) from pg_constraint
       where conrelid = format('%I.%I', $1::text, $2::text)::regclass
       union all
       select 'storage parameters', array_to_string(reloptions, ', ') from pg_class
       where oid = format('%I.%I', $1::text, $2::text)::regclass
       order by 1, 2`,
      [schema, table],
    )
    return r.rows
  }

  it('given live tables, the scratch copies have the same columns, index and constraint names, partial indexes, storage parameters and grants', async () => {
    const role = `reader_${randomBytes(4).toString('hex')}`
    await pool.query(`create role ${role}`)
    await pool.query(`grant select on sensor_status, alerts to ${role}`)
    // an operator's own setting, beside the migrations' fillfactor (sensor_status, alert_conditions)
    await pool.query('alter table sensor_status set (autovacuum_vacuum_scale_factor = 0.05)')
    try {
      const alerts = {
        ...sensorStatus,
        name: 'alerts',
        tables: ['alerts', 'alert_conditions', 'notification_outbox'] as const,
      }
      for (const [name, projection] of [
        ['sensor-status', sensorStatus],
        ['alerts', alerts],
      ] as const) {
        const scratch = await prepareScratch(db, name, projection)
        for (const table of [...projection.tables, 'processor_checkpoints']) {
          expect(await shape(scratch, table), table).toEqual(await shape('public', table))
        }
      }
      const granted = await pool.query<{ table_schema: string; table_name: string }>(
        `select table_schema, table_name from information_schema.role_table_grants
         where grantee = $1 and privilege_type = 'SELECT' order by 1, 2`,
        [role],
      )
      expect(granted.rows).toEqual([
        { table_schema: 'public', table_name: 'alerts' },
        { table_schema: 'public', table_name: 'sensor_status' },
        { table_schema: 'rebuild_alerts', table_name: 'alerts' },
        { table_schema: 'rebuild_sensor_status', table_name: 'sensor_status' },
      ])
      // the partial unique index still allows one unresolved alert per sensor and rule only
      expect((await shape('rebuild_alerts', 'alerts')).map((r) => r.def)).toContain(
        "CREATE UNIQUE INDEX alerts_one_unresolved ON t USING btree (device_id, rule_id) WHERE (state <> 'resolved'::text)",
      )
      // `like ... including all` copies no storage parameters: these were set on the copy
      expect(await shape('rebuild_sensor_status', 'sensor_status')).toContainEqual({
        name: 'storage parameters',
        def: 'fillfactor=50, autovacuum_vacuum_scale_factor=0.05',
      })
    } finally {
      // the operator's setting and the scratch schemas go, whatever the assertions said
      await pool.query('alter table sensor_status reset (autovacuum_vacuum_scale_factor)')
      await pool.query('drop schema if exists rebuild_alerts, rebuild_sensor_status cascade')
    }
  })

  it('a write waiting on the swap lands in the new table; the retired one keeps what it had', async () => {
    await db.insertInto('readings').values(readingRow('live-1', 1)).execute()
    const scratch = await prepareScratch(db, 'readings', readings)
    await db
      .withSchema(scratch)
      .insertInto('readings')
      .values([readingRow('live-1', 1), readingRow('rebuilt-2', 2)])
      .execute()
    const writer = new pg.Client(url)
    await writer.connect()
    const retired = retiredSchemaName('readings', new Date())
    let waiting: Promise<unknown> | undefined
    let settled = false
    await db.transaction().execute(async (trx) => {
      await lockLive(trx, ['readings'], readings, 1000)
      waiting = writer
        .query(
          `insert into readings (event_id, device_id, metric, value, unit, occurred_at, hlc, correlation_id,
             stream_seq, ingested_at) values ('late-3', 'd-1', 'temperature', 3, 'C', now(), 'h', 'c', 3, now())`,
        )
        .finally(() => (settled = true))
      await new Promise((r) => setTimeout(r, 300))
      expect(settled).toBe(false) // held by the swap
      await swapIn(trx, 'readings', readings, retired)
    })
    await waiting
    await writer.end()
    const ids = async (schema: string) =>
      (
        await sql<{ event_id: string }>`select event_id from ${sql.id(schema, 'readings')}
          order by event_id`.execute(db)
      ).rows.map((r) => r.event_id)
    expect(await ids('public')).toEqual(['late-3', 'live-1', 'rebuilt-2'])
    expect(await ids(retired)).toEqual(['live-1'])
    const schemas = await pool.query(
      "select 1 from pg_namespace where nspname = 'rebuild_readings'",
    )
    expect(schemas.rowCount).toBe(0)
  })

  it('of a shared table only the projection’s own row is swapped', async () => {
    await db
      .insertInto('projection_clocks')
      .values([
        {
          projection: 'sensor-status',
          now_at: new Date('2026-11-23T10:00:00Z'),
          tick_event_id: 'old',
        },
        { projection: 'alerts', now_at: new Date('2026-11-23T10:05:00Z'), tick_event_id: 'alerts' },
      ])
      .execute()
    const scratch = await prepareScratch(db, 'sensor-status', sensorStatus)
    await db
      .withSchema(scratch)
      .insertInto('projection_clocks')
      .values({
        projection: 'sensor-status',
        now_at: new Date('2026-11-23T10:09:00Z'),
        tick_event_id: 'new',
      })
      .execute()
    const retired = retiredSchemaName('sensor-status', new Date())
    await db.transaction().execute(async (trx) => {
      await lockLive(trx, ['sensor-status'], sensorStatus, 1000)
      await swapIn(trx, 'sensor-status', sensorStatus, retired)
    })
    const clocks = await db
      .selectFrom('projection_clocks')
      .select(['projection', 'tick_event_id'])
      .orderBy('projection')
      .execute()
    expect(clocks).toEqual([
      { projection: 'alerts', tick_event_id: 'alerts' },
      { projection: 'sensor-status', tick_event_id: 'new' },
    ])
    const kept = await sql<{
      tick_event_id: string
    }>`select tick_event_id from ${sql.id(retired, 'projection_clocks')}`.execute(db)
    expect(kept.rows).toEqual([{ tick_event_id: 'old' }])
  })

  it('refuses, creating nothing, when a view reads a live table', async () => {
    await pool.query('create view hot_readings as select * from readings where value > 40')
    await expect(prepareScratch(db, 'readings', readings)).rejects.toThrow(RebuildRefusedError)
    await expect(prepareScratch(db, 'readings', readings)).rejects.toThrow(
      "cannot rebuild 'readings': view hot_readings reads table 'readings'",
    )
    const schemas = await pool.query(
      "select 1 from pg_namespace where nspname = 'rebuild_readings'",
    )
    expect(schemas.rowCount).toBe(0)
    await pool.query('drop view hot_readings')
  })
})
