import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { PublishPipeline } from '../infra/publisher.ts'
import type { Runtime } from '../app/runtime.ts'
import { freshDatabase, startNatsServer, type NatsServer } from './harness/test-servers.ts'
import {
  readingDraft,
  runCli,
  spawnCli,
  testConfig,
  testEnv,
  testPublisher,
  testRuntime,
  waitFor,
  type CliProcess,
} from './fixtures.ts'

/** What the read model holds, read the way an operator would: with SQL. */
async function snapshot(client: pg.Client) {
  const r = await client.query<{ rows: number; distinct: number; checkpoint: number }>(
    `select (select count(*) from readings)::int as rows,
            (select count(distinct event_id) from readings)::int as distinct,
            coalesce((select last_seq from processor_checkpoints where processor = 'readings'), 0)::int as checkpoint`,
  )
  return r.rows[0]!
}

interface ProcessFixture {
  /** Environment for `fleetstream run` processes. */
  env: Record<string, string>
  /** In-process connections for publishing. */
  rt: Runtime
  /** Reads the read model as an operator would. */
  client: pg.Client
}

/** A nats-server, a database set up by `fleetstream setup`, and small batches so a kill lands mid-run. */
function useProcessFixture(batchSize: number): ProcessFixture {
  const f = {} as ProcessFixture
  let nats: NatsServer
  beforeAll(async () => {
    nats = await startNatsServer()
    const dbUrl = await freshDatabase()
    f.env = testEnv(nats.url, dbUrl, {
      PROCESSOR_BATCH_SIZE: String(batchSize),
      PROCESSOR_BATCH_LINGER_MS: '1',
    })
    f.rt = await testRuntime(testConfig(nats.url, dbUrl))
    f.client = new pg.Client(dbUrl)
    await f.client.connect()
  })
  afterAll(async () => {
    await f.client.end()
    await f.rt.close()
    await nats.cleanup()
  })
  return f
}

describe('readings processor as a process', () => {
  const f = useProcessFixture(100)

  it('killed with SIGKILL mid-run and restarted, ends with exactly the distinct input', async () => {
    const publisher = testPublisher(f.rt)
    const distinct = new Set<string>()
    const total = 30_000
    // Publish steadily in the background while the processor is killed and restarted.
    const publishing = (async () => {
      const pipe = new PublishPipeline(128)
      for (let i = 0; i < total; i++) {
        const e = publisher.stamp(readingDraft(`sensor-${i % 250}`, i))
        distinct.add(e.eventId)
        await pipe.submit(() => publisher.publishEvent(e))
        if (i % 10 === 0 && i > 0) {
          // a re-send under the same eventId, as a QoS-1 device would
          await pipe.submit(() => publisher.publishEvent(e))
        }
        if (i % 1000 === 999) await new Promise((r) => setTimeout(r, 20))
      }
      await pipe.drain()
    })()

    let proc: CliProcess = spawnCli(['run', 'readings', '--no-clock'], f.env)
    const kills: { checkpoint: number; rows: number }[] = []
    for (let k = 0; k < 3; k++) {
      const start = (await snapshot(f.client)).checkpoint
      await waitFor(
        `processor to make progress past ${start}`,
        async () => (await snapshot(f.client)).checkpoint > start + 500,
        60_000,
        proc.output,
      )
      proc.child.kill('SIGKILL')
      expect(await proc.exited).toBe(137)
      // Rows and checkpoint commit together: a kill never leaves one without the other.
      const after = await snapshot(f.client)
      expect(after.rows).toBe(after.checkpoint)
      expect(after.distinct).toBe(after.rows)
      kills.push({ checkpoint: after.checkpoint, rows: after.rows })
      proc = spawnCli(['run', 'readings', '--no-clock'], f.env)
    }
    await publishing
    expect(publisher.stats.published).toBe(total)

    await waitFor(
      `the restarted processor to apply all ${total} events`,
      async () => (await snapshot(f.client)).checkpoint === total,
      120_000,
      async () => `${JSON.stringify(await snapshot(f.client))}\n${proc.output()}`,
    )
    proc.child.kill('SIGTERM')
    expect(await proc.exited).toBe(0)

    const final = await snapshot(f.client)
    expect(final).toEqual({ rows: total, distinct: total, checkpoint: total })
    const ids = await f.client.query<{ event_id: string }>('select event_id from readings')
    expect(new Set(ids.rows.map((r) => r.event_id))).toEqual(distinct)
    // the kills really happened mid-run
    expect(kills.every((k) => k.checkpoint > 0 && k.checkpoint < total)).toBe(true)
  })
})

describe('graceful shutdown', () => {
  const f = useProcessFixture(50)

  it('on SIGTERM finishes the batch in hand, exits 0, and a restart continues from the checkpoint', async () => {
    const publisher = testPublisher(f.rt)
    const pipe = new PublishPipeline(256)
    for (let i = 0; i < 20_000; i++)
      await pipe.submit(() => publisher.publish(readingDraft(`s-${i % 50}`, i)))
    await pipe.drain()

    const proc = spawnCli(['run', 'readings', '--no-clock'], f.env)
    await waitFor(
      'processor to start applying',
      async () => (await snapshot(f.client)).checkpoint > 1000,
      60_000,
      proc.output,
    )
    proc.child.kill('SIGTERM')
    expect(await proc.exited).toBe(0)
    const stopped = await snapshot(f.client)
    expect(stopped.rows).toBe(stopped.checkpoint)
    expect(stopped.checkpoint).toBeLessThanOrEqual(20_000)

    const again = spawnCli(['run', 'readings', '--no-clock'], f.env)
    await waitFor(
      'restart to finish the backlog',
      async () => (await snapshot(f.client)).checkpoint === 20_000,
      60_000,
      again.output,
    )
    again.child.kill('SIGINT')
    expect(await again.exited).toBe(0)
    expect(await snapshot(f.client)).toEqual({ rows: 20_000, distinct: 20_000, checkpoint: 20_000 })
  })
})

describe('the main job (npm start runs `fleetstream start`)', () => {
  let nats: NatsServer
  let dbUrl: string
  beforeAll(async () => {
    nats = await startNatsServer()
    dbUrl = await freshDatabase()
  })
  afterAll(async () => nats.cleanup())

  it('sets everything up, simulates a fleet, applies readings and tells the user how to look', async () => {
    const r = await runCli(
      ['start', '--duration', '3', '--devices', '20', '--rate', '300'],
      testEnv(nats.url, dbUrl),
      90_000,
    )
    expect(r.code, r.output).toBe(0)
    expect(r.output).toMatch(/published [\d,]+ events/)
    expect(r.output).toContain(
      'select device_id, metric, value, unit, occurred_at from latest_readings',
    )
    expect(r.output).toContain(`nats --server '${nats.url}' stream info FLEET_EVENTS`)
    // A newcomer's first run shows no warning: nothing went wrong.
    expect(r.output).not.toMatch(/"level":(40|50|60)/)

    const client = new pg.Client(dbUrl)
    await client.connect()
    const rows = await client.query<{ n: number; sensors: number }>(
      'select count(*)::int as n, count(distinct device_id)::int as sensors from readings',
    )
    await client.end()
    expect(rows.rows[0]!.n).toBeGreaterThan(300)
    expect(rows.rows[0]!.sensors).toBe(20)
    const applied = /processor readings: applied ([\d,]+)/.exec(r.output)?.[1]?.replaceAll(',', '')
    expect(Number(applied)).toBe(rows.rows[0]!.n)
  })
})
