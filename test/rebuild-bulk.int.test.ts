import { sql, type Kysely } from 'kysely'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { createKysely, createPool } from '../infra/database.ts'
import { createLogger } from '../infra/logger.ts'
import {
  deferIndexes,
  prepareScratch,
  restoreIndexes,
  scratchSchemaName,
} from '../processors/admin/blue-green.ts'
import { onOneConnection } from '../processors/admin/copy-in.ts'
import { copyText } from '../projections/copy-rows.ts'
import { migrateToLatest } from '../projections/migrate.ts'
import { anyEvents, type ProjectedEvent } from '../projections/projection.ts'
import { readingsBulkLoad, readingsProjection } from '../projections/readings.ts'
import type { Database } from '../projections/tables.ts'
import type { ReadingRecorded } from '../schemas/events.ts'
import { freshDatabase } from './harness/test-servers.ts'

const readings = anyEvents(readingsProjection)

/** A reading; `n` orders HLCs and sequences, `dup` re-uses an earlier event id with its content. */
function reading(n: number, device: string, value: number, minute = 0): ProjectedEvent {
  const event: ReadingRecorded = {
    eventId: `0193a000-0000-7000-8000-${String(n).padStart(12, '0')}`,
    deviceId: device,
    type: 'reading.recorded',
    version: 1,
    occurredAt: new Date(Date.UTC(2026, 10, 23, 10, minute, n % 60)).toISOString(),
    hlc: `1795428000000-${String(n % 3).padStart(6, '0')}-gw-${n}`,
    source: device,
    correlationId: `0193a000-0000-7000-9000-${String(n).padStart(12, '0')}`,
    // Some caused by another event: the COPY writes both a causation id and \N.
    ...(n % 3 === 0
      ? { causationId: `0193a000-0000-7000-a000-${String(n).padStart(12, '0')}` }
      : {}),
    data: { metric: n % 2 === 0 ? 'temperature' : 'humidity', value, unit: 'C\\x' },
  } as ReadingRecorded
  return { event, streamSeq: n, ingestedAt: new Date(Date.UTC(2026, 10, 23, 10, 5)) }
}

describe('a rebuild bulk load', () => {
  let pool: pg.Pool
  let db: Kysely<Database>
  beforeAll(async () => {
    const url = await freshDatabase()
    pool = createPool(url, { log: createLogger({ level: 'silent', name: 'test' }) })
    db = createKysely<Database>(pool)
    await migrateToLatest(db as Kysely<unknown>)
  })
  afterAll(async () => {
    await db.destroy()
  })

  it('COPY text keeps tabs, newlines, backslashes, nulls and timestamps', async () => {
    await pool.query('create table copy_probe (a text, b float8, c timestamptz, d text)')
    const at = new Date('2026-11-23T10:00:00.123Z')
    const rows = [
      { a: 'tab\there', b: 1.5, c: at, d: null },
      { a: 'line\nbreak\r\\n', b: -0.25, c: '2026-11-23T11:00:00+01:00', d: 'x' },
    ]
    const columns = ['a', 'b', 'c', 'd'] as const
    await onOneConnection(pool, (one, copy) =>
      one.transaction().execute(() => copy('copy_probe', columns, copyText(rows, columns))),
    )
    const back = await pool.query<{ a: string; b: number; c: Date; d: string | null }>(
      'select * from copy_probe order by b desc',
    )
    expect(back.rows).toEqual([
      { a: 'tab\there', b: 1.5, c: at, d: null },
      { a: 'line\nbreak\r\\n', b: -0.25, c: new Date('2026-11-23T10:00:00Z'), d: 'x' },
    ])
  })

  it('equals the live projection, duplicates across chunks included, and restores the deferred indexes', async () => {
    const events: ProjectedEvent[] = []
    for (let n = 1; n <= 300; n++) events.push(reading(n, `d-${n % 7}`, n / 4, n % 3))
    // Re-published copies (same event id and content, later sequence), in the same and a later chunk.
    const again = (n: number, seq: number): ProjectedEvent => ({
      ...reading(n, `d-${n % 7}`, n / 4, n % 3),
      streamSeq: seq,
    })
    // Two readings with one HLC, the newest of their sensor and metric: the greater event id wins,
    // whichever came first.
    const tied = (n: number, id: string, seq: number): ProjectedEvent => {
      const r = reading(n, 'd-0', n)
      const e = r.event as ReadingRecorded
      return {
        ...r,
        streamSeq: seq,
        event: { ...e, eventId: id, hlc: '1795428000000-000009-gw-t' },
      }
    }
    const chunks = [
      [...events.slice(0, 150), again(10, 1001), tied(302, 'tie-b', 1004)],
      [again(20, 1002), ...events.slice(150), again(160, 1003), tied(304, 'tie-a', 1005)],
    ]
    for (const chunk of chunks) {
      await db.transaction().execute((trx) => readings.apply(trx, chunk))
    }

    const scratch = await prepareScratch(db, 'readings', readings)
    const defs = await deferIndexes(db, 'readings', readings)
    expect(defs.map((d) => /INDEX (\S+)/.exec(d)?.[1]).sort()).toEqual([
      'readings_device_metric_time',
      'readings_per_minute_metric_minute',
    ])
    const scratchPool = createPool(pool.options.connectionString as string, {
      log: createLogger({ level: 'silent', name: 'test' }),
      searchPath: [scratch],
    })
    try {
      for (const chunk of chunks) {
        await onOneConnection(scratchPool, (one, copy) =>
          one.transaction().execute((trx) => readingsBulkLoad.apply(trx, chunk, copy)),
        )
      }
      await onOneConnection(scratchPool, (one) =>
        one.transaction().execute((trx) => readingsBulkLoad.finish(trx)),
      )
    } finally {
      await scratchPool.end()
    }
    await restoreIndexes(db, defs)

    for (const table of ['readings', 'latest_readings', 'readings_per_minute']) {
      const rows = async (schema: string) =>
        (
          await sql<
            Record<string, unknown>
          >`select * from ${sql.id(schema, table)} order by 1, 2, 3`.execute(db)
        ).rows
      expect(await rows(scratchSchemaName('readings')), table).toEqual(await rows('public'))
    }
    const newest = await sql<{ event_id: string }>`select event_id from ${sql.id(
      scratchSchemaName('readings'),
      'latest_readings',
    )} where device_id = 'd-0' and metric = 'temperature'`.execute(db)
    expect(newest.rows).toEqual([{ event_id: 'tie-b' }])
    const indexes = await pool.query<{ name: string }>(
      `select indexname as name from pg_indexes where schemaname = $1
         and tablename in ('readings', 'latest_readings', 'readings_per_minute') order by 1`,
      [scratch],
    )
    const live = await pool.query<{ name: string }>(
      `select indexname as name from pg_indexes where schemaname = 'public'
         and tablename in ('readings', 'latest_readings', 'readings_per_minute') order by 1`,
    )
    expect(indexes.rows).toEqual(live.rows)
  })
})
