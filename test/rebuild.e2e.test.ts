import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Runtime } from '../app/runtime.ts'
import { PROCESSOR_NAMES } from '../processors/processor-registry.ts'
import { resetProjection } from '../processors/admin/reset.ts'
import { simulateFleet } from '../simulator/fleet.ts'
import { startNatsServer, freshDatabase, type NatsServer } from './harness/test-servers.ts'
import {
  FAST_FORWARD_TICKS,
  allCaughtUp,
  dumpReadModels,
  READ_MODEL_TABLE_NAMES,
  rulesFile,
  runCli,
  spawnCli,
  testConfig,
  testEnv,
  testPublisher,
  testRuntime,
  tickDraft,
  waitFor,
  type CliProcess,
} from './fixtures.ts'

/**
 * Queries every read model in a loop, as a dashboard would, counting what it saw: a failed
 * query, or an empty table once it held rows, is downtime.
 */
function queryLoop(url: string) {
  const stats = { queries: 0, failed: [] as string[], emptied: [] as string[] }
  const seen = new Set<string>()
  const state = { running: true }
  const done = (async () => {
    const client = new pg.Client(url)
    await client.connect()
    try {
      while (state.running) {
        for (const t of READ_MODEL_TABLE_NAMES) {
          try {
            const r = await client.query<{ n: number }>(`select count(*)::int as n from ${t}`)
            stats.queries++
            const n = r.rows[0]?.n ?? 0
            if (n > 0) seen.add(t)
            else if (seen.has(t)) stats.emptied.push(t)
          } catch (err) {
            stats.failed.push(`${t}: ${(err as Error).message}`)
          }
        }
        await new Promise((r) => setTimeout(r, 5))
      }
    } finally {
      await client.end()
    }
  })()
  return {
    stats,
    async stop() {
      state.running = false
      await done
    },
  }
}

/** The JSON line a `--json` command printed (its progress goes to stderr, in the same capture). */
function jsonLine(output: string): unknown {
  const line = output.split('\n').find((l) => l.startsWith('{'))
  if (line === undefined) throw new Error(`no JSON in the output:\n${output}`)
  return JSON.parse(line)
}

interface RebuildJson {
  processor: string
  applied: number
  checkpoint: number
  retired: string
  lockedMs: number
}

describe('fleetstream rebuild and replay, with a live processor running', () => {
  let nats: NatsServer
  let rt: Runtime
  let env: Record<string, string>
  let live: CliProcess
  let client: pg.Client
  const startLive = (extra: Record<string, string> = {}) =>
    spawnCli(['run', '--no-clock'], { ...env, ...extra })
  const caughtUp = () => allCaughtUp(rt, PROCESSOR_NAMES, 120_000)
  const outboxDrained = () =>
    waitFor('the outbox to drain', async () => {
      const r = await client.query('select 1 from notification_outbox where published_at is null')
      return r.rowCount === 0
    })

  beforeAll(async () => {
    nats = await startNatsServer()
    const dbUrl = await freshDatabase()
    const extra = {
      ...FAST_FORWARD_TICKS,
      ALERT_RULES_FILE: await rulesFile(),
      FLEET_DUPLICATE_WINDOW_SECONDS: '1',
      SENSOR_INACTIVITY_TIMEOUT_SECONDS: '30',
    }
    env = testEnv(nats.url, dbUrl, extra)
    rt = await testRuntime(testConfig(nats.url, dbUrl, extra))
    client = new pg.Client(dbUrl)
    await client.connect()
    live = startLive()
    // A history to rebuild: a fleet with duplicates and heat episodes, an operator action, ticks.
    const publisher = testPublisher(rt, 'sim')
    await simulateFleet(publisher, {
      devices: 30,
      rate: 1500,
      durationSeconds: 3,
      duplicateRatio: 0.05,
      seed: 3,
    })
    const ops = testPublisher(rt, 'ops')
    for (const value of [55, 56, 57]) {
      await ops.publish({
        type: 'reading.recorded',
        deviceId: 'hot-1',
        data: { metric: 'temperature', value, unit: 'C' },
      })
    }
    await ops.publish({
      type: 'status.changed',
      deviceId: 'sensor-00002',
      data: { status: 'maintenance' },
    })
    await ops.publish(tickDraft(Date.now() + 40_000))
    await caughtUp()
  }, 120_000)

  afterAll(async () => {
    live.child.kill('SIGKILL')
    await live.exited
    await client.end()
    await rt.close()
    await nats.cleanup()
  })

  it('rebuilds each projection with zero downtime; after the swaps every table equals a drop+rebuild row by row', async () => {
    await outboxDrained()
    const notificationsBefore = (await rt.jsm.streams.info(rt.config.streams.notifications)).state
      .messages
    expect(notificationsBefore).toBeGreaterThan(0)
    const queries = queryLoop(rt.config.databaseUrl)
    // The fleet keeps publishing, and the clock ticking, through all three rebuilds.
    const publishing = new AbortController()
    const fleet = simulateFleet(
      testPublisher(rt, 'sim-2'),
      { devices: 30, rate: 300, durationSeconds: 0, duplicateRatio: 0.05, seed: 5 },
      publishing.signal,
    )
    const ticks = (async () => {
      const ops = testPublisher(rt, 'clock')
      while (!publishing.signal.aborted) {
        await ops.publish(tickDraft(Date.now() + 40_000))
        await new Promise((r) => setTimeout(r, 1000))
      }
    })()

    const results: RebuildJson[] = []
    try {
      for (const name of PROCESSOR_NAMES) {
        const r = await runCli(['rebuild', name, '--json', '--batch-size', '700'], env, 120_000)
        expect(r.code, r.output).toBe(0)
        const result = jsonLine(r.output) as RebuildJson
        expect(result).toMatchObject({ processor: name })
        expect(result.checkpoint).toBeGreaterThan(0)
        results.push(result)
        // The live processor keeps going: the next events land in the new tables.
        await waitFor(
          `processor ${name} to move past the swap`,
          async () =>
            (
              await client.query<{ n: number }>(
                'select last_seq::int as n from processor_checkpoints where processor = $1',
                [name],
              )
            ).rows[0]!.n > result.checkpoint,
        )
      }
    } finally {
      publishing.abort()
      await Promise.all([fleet, ticks])
      await queries.stop()
    }
    await caughtUp()
    await outboxDrained()

    // Zero downtime: every query answered, no table was ever seen empty after it held rows.
    expect(queries.stats.failed).toEqual([])
    expect(queries.stats.emptied).toEqual([])
    expect(queries.stats.queries).toBeGreaterThan(500)

    // Later events are in the new tables; the retired ones stopped at the swap.
    const readings = results.find((r) => r.processor === 'readings')
    const after = await client.query<{ retired: number; current: number }>(
      `select (select count(*) from ${readings!.retired}.readings where stream_seq > $1)::int as retired,
              (select count(*) from public.readings where stream_seq > $1)::int as current`,
      [readings!.checkpoint],
    )
    expect(after.rows[0]).toMatchObject({ retired: 0 })
    expect(after.rows[0]!.current).toBeGreaterThan(0)
    // The swapped-in tables carry the live names of indexes and constraints.
    const idx = await client.query<{ indexname: string }>(
      "select indexname from pg_indexes where schemaname = 'public' and tablename = 'alerts' order by 1",
    )
    expect(idx.rows.map((r) => r.indexname)).toEqual([
      'alerts_one_unresolved',
      'alerts_pkey',
      'alerts_state_severity',
    ])
    // No rebuild schema is left behind.
    const left = await client.query("select 1 from pg_namespace where nspname like 'rebuild_%'")
    expect(left.rowCount).toBe(0)

    // The reference: every projection dropped and rebuilt from sequence 1 by the processors.
    const rebuilt = await dumpReadModels(rt)
    expect(rebuilt.readings!.length).toBeGreaterThan(3000)
    live.child.kill('SIGTERM')
    expect(await live.exited).toBe(0)
    const checkpoints = async () =>
      (
        await client.query<{ processor: string; n: number }>(
          'select processor, last_seq::int as n from processor_checkpoints order by processor',
        )
      ).rows
    const reached = await checkpoints()
    for (const n of PROCESSOR_NAMES) await resetProjection(rt.db, n, rt.processors[n].projection)
    live = startLive({ PROCESSOR_BATCH_SIZE: '97' })
    // The old consumers look caught up until the new process re-anchors them: wait for the checkpoints.
    await waitFor(
      'the processors to re-apply the stream',
      async () => JSON.stringify(await checkpoints()) === JSON.stringify(reached),
      120_000,
      async () => JSON.stringify(await checkpoints()),
    )
    await caughtUp()
    await outboxDrained()
    const reference = await dumpReadModels(rt)
    for (const t of Object.keys(reference)) expect(rebuilt[t], t).toEqual(reference[t])
    // and no notification went out twice, neither from the rebuilds nor from the reference
    const distinct = await client.query<{ n: number }>(
      'select count(*)::int as n from notification_outbox',
    )
    expect((await rt.jsm.streams.info(rt.config.streams.notifications)).state.messages).toBe(
      distinct.rows[0]!.n,
    )
  }, 300_000)

  it('a rebuild killed with SIGKILL leaves the live tables untouched, and a re-run succeeds', async () => {
    await caughtUp()
    const before = await dumpReadModels(rt)
    const scratchAt = async () =>
      (
        await client
          .query<{ n: number }>(
            "select last_seq::int as n from rebuild_readings.processor_checkpoints where processor = 'readings'",
          )
          .catch(() => ({ rows: [] as { n: number }[] }))
      ).rows[0]?.n ?? 0
    const rebuild = spawnCli(['rebuild', 'readings', '--batch-size', '50'], env)
    await waitFor(
      'the rebuild to get going',
      async () => (await scratchAt()) > 500,
      60_000,
      () => rebuild.output(),
    )
    rebuild.child.kill('SIGKILL')
    expect(await rebuild.exited).toBe(137)
    expect(await dumpReadModels(rt)).toEqual(before)

    const again = await runCli(['rebuild', 'readings', '--drop-retired'], env, 120_000)
    expect(again.code, again.output).toBe(0)
    expect(again.output).toMatch(/rebuilt readings: [\d,]+ events applied/)
    expect(await dumpReadModels(rt)).toEqual(before)
    const schemas = await client.query(
      "select 1 from pg_namespace where nspname like 'rebuild_readings%'",
    )
    expect(schemas.rowCount).toBe(0)
  }, 180_000)

  it('replay --from-seq moves the processor back; it re-applies and the tables end identical, nothing doubled', async () => {
    await caughtUp()
    const before = await dumpReadModels(rt)
    const checkpoint = async (name: string) =>
      (
        await client.query<{ n: number }>(
          'select last_seq::int as n from processor_checkpoints where processor = $1',
          [name],
        )
      ).rows[0]!.n
    const at = await checkpoint('readings')
    const r = await runCli(['replay', 'readings', '--from-seq', '100', '--json'], env)
    expect(r.code, r.output).toBe(0)
    expect(jsonLine(r.output)).toMatchObject({
      processor: 'readings',
      fromSeq: 100,
      previousCheckpoint: at,
      processorRunning: true,
      caughtUp: true,
    })
    await caughtUp()
    expect(await checkpoint('readings')).toBe(at)
    expect(await dumpReadModels(rt)).toEqual(before)

    const since = await runCli(['replay', 'alerts', '--since', '10m'], env)
    expect(since.code, since.output).toBe(0)
    expect(since.output).toMatch(/replayed alerts: back at stream sequence [\d,]+/)
    await caughtUp()
    expect(await dumpReadModels(rt)).toEqual(before)
  }, 120_000)

  it('replay refuses what cannot be, naming the option, the rule and the value (exit 2)', async () => {
    const last = (await rt.jsm.streams.info(rt.config.streams.events)).state.last_seq
    const cases: [string[], string][] = [
      [
        ['replay', 'readings', '--from-seq', String(last + 1)],
        `'--from-seq' must be an integer from 1 to the last sequence of FLEET_EVENTS (${last}), got '${last + 1}'`,
      ],
      [
        ['replay', 'readings', '--from-seq', '0'],
        "option '--from-seq <n>' argument '0' is invalid. must be an integer >= 1, got '0'",
      ],
      [
        ['replay', 'readings', '--since', 'yesterday'],
        "argument 'yesterday' is invalid. must be an ISO 8601 time with a zone",
      ],
      [
        ['replay', 'readings', '--since', '2999-01-01T00:00:00Z'],
        "'--since' must not be in the future, got '2999-01-01T00:00:00Z'",
      ],
      [
        ['replay', 'readings', '--from-seq', '5', '--since', '1h'],
        "give exactly one of '--from-seq <n>' and '--since <time>'",
      ],
      [
        ['rebuild', 'nope'],
        "value 'nope' is invalid for argument 'projection'. must be one of sensor-status, readings, alerts, got 'nope'",
      ],
    ]
    for (const [args, message] of cases) {
      const r = await runCli(args, env)
      expect(r.code, `${args.join(' ')}: ${r.output}`).toBe(2)
      expect(r.output).toContain(message)
    }
  }, 60_000)
})
