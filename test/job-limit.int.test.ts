import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type BenchEvent, stampReading } from '../bench/common.ts'
import { JOB_TABLES, jobWrite } from '../bench/job-limit.ts'
import { defaultAlertRulesPath, loadAlertRules } from '../infra/alert-rules-file.ts'
import { PublishPipeline } from '../infra/publisher.ts'
import type { ThresholdRule } from '../projections/alert-rules.ts'
import { createKysely, createPool } from '../infra/database.ts'
import { createLogger } from '../infra/logger.ts'
import { migrateToLatest } from '../projections/migrate.ts'
import { PROCESSOR_NAMES } from '../processors/processor-registry.ts'
import { allCaughtUp, pipeline, testPublisher, type Pipeline } from './fixtures.ts'
import { freshDatabase } from './harness/test-servers.ts'

/** Columns that differ legitimately: when the stream stored an event (the server's clock). */
const OMIT = ['ingested_at']

/** Every row of a table, in a stable order, without {@link OMIT}. */
async function dump(pool: pg.Pool, table: string): Promise<unknown[]> {
  const { rows } = await pool.query<Record<string, unknown>>(`select * from ${table}`)
  return rows
    .map((r) => Object.fromEntries(Object.entries(r).filter(([c]) => !OMIT.includes(c))))
    .map((r) => JSON.stringify(r))
    .sort()
}

/**
 * The bench's (d) writes the three read models' rows by hand, and the bench compares its row counts
 * with the processors'. A slip in its SQL once reached a 1M run (a syntax error, found after the
 * limits had run); a wrong row would make the limit measure another job. Here it writes the same
 * readings as the processors, window trims included, and every row must be theirs.
 */
describe("the bench's (d), the job's rows written by hand", () => {
  // Fewer sensors than the bench, so that each gets past its trim point more than once (humidity
  // feeds one rule, temperature two: 720 readings are 1,080 inputs; the default rules have four
  // threshold rules, so trims come at 256-508). No batch may hold a sensor twice (job-limit.ts),
  // so both write batches of one reading per sensor.
  const SENSORS = 25
  const EVENTS = 18_000
  let p: Pipeline
  let events: BenchEvent[]
  let rules: ThresholdRule[]
  let jobUrl: string
  let jobPool: pg.Pool

  beforeAll(async () => {
    p = await pipeline({
      ALERT_RULES_FILE: defaultAlertRulesPath(),
      PROCESSOR_BATCH_SIZE: String(SENSORS),
    })
    rules = (await loadAlertRules(defaultAlertRulesPath())).rules.filter(
      (r): r is ThresholdRule => r.kind === 'threshold',
    )
    const publisher = testPublisher(p.rt)
    events = Array.from({ length: EVENTS }, (_, i) => stampReading(publisher, i, SENSORS))
    // One connection, in order: stream sequence i + 1 is event i, as (d) numbers them.
    const pipe = new PublishPipeline(256)
    for (const e of events) await pipe.submit(() => publisher.publishEvent(e.event))
    await pipe.drain()
    jobUrl = await freshDatabase()
    jobPool = createPool(jobUrl, {
      log: createLogger({ level: 'silent', name: 'test' }),
      max: 2,
    })
    await migrateToLatest(createKysely(jobPool))
  })
  afterAll(async () => {
    await jobPool.end()
    await p.close()
  })

  it('writes every row the processors write for the same readings, trims included', async () => {
    p.start()
    await allCaughtUp(p.rt, PROCESSOR_NAMES, 120_000)
    await p.stop()
    const job = await jobWrite(jobUrl, events, rules, SENSORS)
    expect(job.batch).toBe(SENSORS)

    const trimmed = await p.rt.pool.query<{ n: string }>(
      'select count(distinct device_id) as n from alert_horizons',
    )
    // Every sensor was trimmed, so (d)'s trimming SQL ran and is compared too.
    expect(Number(trimmed.rows[0]?.n)).toBe(SENSORS)
    for (const table of JOB_TABLES) {
      const [byProcessors, byJob] = await Promise.all([
        dump(p.rt.pool, table),
        dump(jobPool, table),
      ])
      expect({ table, rows: byJob.length }).toEqual({ table, rows: byProcessors.length })
      expect(byJob, table).toEqual(byProcessors)
    }
  })
})
