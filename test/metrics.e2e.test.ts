import { headers } from '@nats-io/transport-node'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Runtime } from '../app/runtime.ts'
import type { StatusReport } from '../cli/fleet-status.ts'
import { PublishPipeline } from '../infra/publisher.ts'
import {
  startNatsServer,
  startPostgres,
  type NatsServer,
  type PgCluster,
} from './harness/test-servers.ts'
import { freePort } from '../testbed/processes.ts'
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

interface Sample {
  readonly name: string
  readonly labels: Readonly<Record<string, string>>
  readonly value: number
}

/** Prometheus text format, sample lines only. */
function parseMetrics(text: string): Sample[] {
  const out: Sample[] = []
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line)
    if (!m) throw new Error(`not a Prometheus sample line: ${line}`)
    const labels: Record<string, string> = {}
    for (const l of (m[2] ?? '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]!] = l[2]!
    out.push({ name: m[1]!, labels, value: Number(m[3]) })
  }
  return out
}

/** The value of the one sample with this name and these labels, or undefined. */
function valueOf(
  samples: readonly Sample[],
  name: string,
  labels: Record<string, string> = {},
): number | undefined {
  const hits = samples.filter(
    (s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v),
  )
  if (hits.length > 1)
    throw new Error(`${hits.length} samples of ${name} match ${JSON.stringify(labels)}`)
  return hits[0]?.value
}

/** The server's URL, from the process's own start-up log line. */
async function metricsUrl(proc: CliProcess): Promise<string> {
  let url: string | undefined
  await waitFor(
    'the metrics server to log its address',
    () => {
      url = /"url":"(http:\/\/127\.0\.0\.1:\d+)"/.exec(proc.output())?.[1]
      return url !== undefined
    },
    30_000,
    proc.output,
  )
  return url!
}

async function get(url: string): Promise<{ status: number; body: string }> {
  const res = await fetch(url, { signal: AbortSignal.timeout(10_000) })
  return { status: res.status, body: await res.text() }
}

async function readyz(base: string): Promise<{ status: number; body: ReadyBody }> {
  const r = await get(`${base}/readyz`)
  return { status: r.status, body: JSON.parse(r.body) as ReadyBody }
}

interface ReadyBody {
  status: string
  failed?: string[]
  checks: Record<string, { ok: boolean; detail?: unknown }>
}

async function scrape(base: string): Promise<Sample[]> {
  const r = await get(`${base}/metrics`)
  expect(r.status).toBe(200)
  return parseMetrics(r.body)
}

describe('metrics, health and readiness of a `run` process', () => {
  let nats: NatsServer
  let pgc: PgCluster
  let rt: Runtime
  let env: Record<string, string>
  let proc: CliProcess
  let base: string
  const published = { readings: 0, garbage: 0 }

  beforeAll(async () => {
    nats = await startNatsServer()
    pgc = await startPostgres() // its own cluster: these tests stop it
    const db = await pgc.createDatabase()
    rt = await testRuntime(testConfig(nats.url, db))
    env = testEnv(nats.url, db, {
      LOG_LEVEL: 'info',
      PROCESSOR_BATCH_SIZE: '100',
      // The lag figures are read in the background: every second here, to wait less.
      METRICS_REFRESH_SECONDS: '1',
    })
  })
  afterAll(async () => {
    if (proc.child.exitCode === null) {
      proc.child.kill('SIGKILL')
      await proc.exited
    }
    await rt.close()
    await pgc.cleanup()
    await nats.cleanup()
  })

  const publishReadings = async (n: number) => {
    const publisher = testPublisher(rt)
    const pipe = new PublishPipeline(128)
    for (let i = 0; i < n; i++)
      await pipe.submit(() => publisher.publish(readingDraft(`s-${i % 25}`, i)))
    await pipe.drain()
    published.readings += n
  }
  const publishGarbage = async (n: number) => {
    for (let i = 0; i < n; i++) {
      const h = headers()
      h.set('Fleet-Hlc', '1795000000000-000000-gw')
      await rt.js.publish('fleet.events.d-9.reading', '{"not": json', {
        msgID: `garbage-${published.garbage}`,
        headers: h,
      })
      published.garbage++
    }
  }
  const rows = async () =>
    (await rt.pool.query<{ n: number }>('select count(*)::int as n from readings')).rows[0]!.n

  it('is alive at once, not ready while Postgres is down at start-up, ready once it is up', async () => {
    await pgc.stop('fast')
    proc = spawnCli(['run', 'readings', 'sensor-status', '--no-clock'], env)
    base = await metricsUrl(proc)

    const health = await get(`${base}/healthz`)
    expect(health.status).toBe(200)
    expect(JSON.parse(health.body)).toMatchObject({ status: 'alive' })
    const notReady = await readyz(base)
    expect(notReady.status).toBe(503)
    expect(notReady.body.failed).toEqual(expect.arrayContaining(['postgres', 'processors']))
    expect(String(notReady.body.checks.postgres?.detail)).toContain('connecting')
    // Scrapes answer before anything is connected: process metrics, no lag figures yet.
    const early = await scrape(base)
    expect(valueOf(early, 'process_resident_memory_bytes')).toBeGreaterThan(0)
    expect(early.some((s) => s.name.startsWith('nodejs_eventloop_lag'))).toBe(true)
    expect((await get(`${base}/nope`)).status).toBe(404)

    await pgc.start()
    await waitFor(
      '/readyz to answer 200',
      async () => (await readyz(base)).status === 200,
      60_000,
      async () => `${JSON.stringify((await readyz(base)).body)}\n${proc.output()}`,
    )
    const ready = await readyz(base)
    expect(ready.body).toMatchObject({
      status: 'ready',
      checks: {
        nats: { ok: true },
        postgres: { ok: true },
        processors: { ok: true, detail: { readings: 'running', 'sensor-status': 'running' } },
      },
    })
  })

  it('counts what it applied and parked, and its lag goes to 0', async () => {
    await publishReadings(1500)
    await publishGarbage(3)
    const total = published.readings + published.garbage

    let s: Sample[] = []
    // The checkpoint at the end of the stream: figures read after the last commit, not before.
    const caughtUp = (p: string) =>
      valueOf(s, 'fleetstream_events_processed_total', { processor: p }) === published.readings &&
      valueOf(s, 'fleetstream_checkpoint_sequence', { processor: p }) === total &&
      valueOf(s, 'fleetstream_consumer_pending_messages', { processor: p }) === 0 &&
      valueOf(s, 'fleetstream_consumer_ack_pending_messages', { processor: p }) === 0 &&
      valueOf(s, 'fleetstream_checkpoint_lag_sequences', { processor: p }) === 0
    await waitFor(
      'the scraped figures to show both processors caught up',
      async () => {
        s = await scrape(base)
        return caughtUp('readings') && caughtUp('sensor-status')
      },
      60_000,
      () =>
        s
          .filter((x) => x.name.startsWith('fleetstream_') && !x.name.includes('_bucket'))
          .map((x) => `${x.name}${JSON.stringify(x.labels)} ${x.value}`)
          .join('\n'),
    )

    expect(await rows()).toBe(published.readings)
    for (const p of ['readings', 'sensor-status']) {
      const v = (name: string, labels: Record<string, string> = {}) =>
        valueOf(s, name, { processor: p, ...labels })
      expect(v('fleetstream_events_failed_total', { reason: 'invalid-json' })).toBe(3)
      expect(v('fleetstream_dlq_depth')).toBe(3)
      expect(v('fleetstream_checkpoint_sequence')).toBe(total)
      expect(v('fleetstream_end_to_end_latency_seconds_count')).toBe(published.readings)
      expect(v('fleetstream_end_to_end_latency_seconds_sum')).toBeGreaterThan(0)
      expect(v('fleetstream_batch_size_events_sum')).toBe(total)
      expect(v('fleetstream_batch_size_events_count')).toBeGreaterThanOrEqual(total / 100)
      expect(v('fleetstream_batch_duration_seconds_count')).toBe(
        v('fleetstream_batch_size_events_count'),
      )
      expect(v('fleetstream_redeliveries_skipped_total')).toBe(0)
      expect(v('fleetstream_transaction_retries_total')).toBe(0)
      expect(v('fleetstream_postgres_circuit_state')).toBe(0)
      expect(v('fleetstream_processor_state', { state: 'running' })).toBe(1)
      expect(v('fleetstream_processor_state', { state: 'standby' })).toBe(0)
    }
    // This process runs two processors: nothing is exported for the third.
    expect(
      valueOf(s, 'fleetstream_events_processed_total', { processor: 'alerts' }),
    ).toBeUndefined()
    expect(valueOf(s, 'fleetstream_stream_messages', { stream: 'FLEET_EVENTS' })).toBe(total)
    expect(valueOf(s, 'fleetstream_stream_last_sequence', { stream: 'FLEET_EVENTS' })).toBe(total)
    // This server sets no storage limit: no share of one to report.
    expect(
      valueOf(s, 'fleetstream_stream_storage_use_ratio', { stream: 'FLEET_EVENTS' }),
    ).toBeUndefined()
    expect(valueOf(s, 'fleetstream_lag_source_up', { source: 'nats' })).toBe(1)
    expect(valueOf(s, 'fleetstream_lag_source_up', { source: 'postgres' })).toBe(1)
  })

  it('is not ready while Postgres is down, opens its breaker, and is ready again when it returns', async () => {
    await pgc.stop('immediate')
    let s: Sample[] = []
    try {
      await waitFor(
        '/readyz to answer 503 naming postgres',
        async () => {
          const r = await readyz(base)
          return r.status === 503 && (r.body.failed ?? []).includes('postgres')
        },
        15_000,
      )
      await publishReadings(300) // ingest goes on; the processors try, fail and open their breakers
      await waitFor(
        'the breaker of readings to show open in /metrics, and the checkpoints unreadable',
        async () => {
          s = await scrape(base)
          return (
            valueOf(s, 'fleetstream_postgres_circuit_state', { processor: 'readings' }) === 2 &&
            valueOf(s, 'fleetstream_lag_source_up', { source: 'postgres' }) === 0
          )
        },
        45_000,
        () => proc.output().split('\n').slice(-5).join('\n'),
      )
      // The scrape answered without Postgres: checkpoint figures are left out, not made up.
      expect(
        valueOf(s, 'fleetstream_checkpoint_sequence', { processor: 'readings' }),
      ).toBeUndefined()
      expect(
        valueOf(s, 'fleetstream_consumer_pending_messages', { processor: 'readings' }),
      ).toBeGreaterThan(0)
      const down = await readyz(base)
      expect(down.status).toBe(503)
      expect(down.body.checks.processors?.ok).toBe(false)
    } finally {
      await pgc.start()
    }
    await waitFor(
      '/readyz to answer 200 after the outage',
      async () => (await readyz(base)).status === 200,
      60_000,
      async () => JSON.stringify((await readyz(base)).body),
    )
    await waitFor(
      'readings to apply what was published during the outage',
      async () => {
        s = await scrape(base)
        return (
          valueOf(s, 'fleetstream_events_processed_total', { processor: 'readings' }) ===
            published.readings &&
          valueOf(s, 'fleetstream_checkpoint_lag_sequences', { processor: 'readings' }) === 0
        )
      },
      60_000,
      () =>
        `published ${published.readings}\n` +
        s
          .filter((x) => x.name.startsWith('fleetstream_') && !x.name.includes('_bucket'))
          .filter((x) => x.labels.processor !== 'sensor-status')
          .map((x) => `${x.name}${JSON.stringify(x.labels)} ${x.value}`)
          .join('\n') +
        `\n${proc.output().split('\n').slice(-40).join('\n')}`,
    )
    expect(await rows()).toBe(published.readings)
    expect(valueOf(s, 'fleetstream_postgres_circuit_state', { processor: 'readings' })).toBe(0)
    // An outage is not poison: nothing more was parked.
    expect(valueOf(s, 'fleetstream_dlq_depth', { processor: 'readings' })).toBe(3)
    // Longer than its waits (15 + 45 + 60 + 60 s): one that stalls fails naming its step and the
    // process's last lines, not the test's timeout.
  }, 200_000)

  it('still answers scrapes in bounded time while NATS is down, and is not ready', async () => {
    await nats.stop()
    try {
      await waitFor(
        '/readyz to answer 503 naming nats',
        async () => {
          const r = await readyz(base)
          return r.status === 503 && (r.body.failed ?? []).includes('nats')
        },
        15_000,
      )
      let s: Sample[] = []
      await waitFor(
        'a scrape without the NATS figures',
        async () => {
          const started = Date.now()
          s = await scrape(base)
          expect(Date.now() - started).toBeLessThan(5000)
          return valueOf(s, 'fleetstream_lag_source_up', { source: 'nats' }) === 0
        },
        15_000,
      )
      expect(
        valueOf(s, 'fleetstream_consumer_pending_messages', { processor: 'readings' }),
      ).toBeUndefined()
      expect(valueOf(s, 'fleetstream_dlq_depth', { processor: 'readings' })).toBeUndefined()
      expect(valueOf(s, 'fleetstream_events_processed_total', { processor: 'readings' })).toBe(
        published.readings,
      )
    } finally {
      await nats.restart()
    }
    await waitFor(
      '/readyz to answer 200 after NATS returns',
      async () => (await readyz(base)).status === 200,
      60_000,
      async () => JSON.stringify((await readyz(base)).body),
    )
    // Both processors through everything published so far (sensor-status too, which the
    // Postgres outage above did not wait for): the status tests below count from here.
    let s: Sample[] = []
    await waitFor(
      'both processors to catch up after the outages',
      async () => {
        s = await scrape(base)
        return ['readings', 'sensor-status'].every(
          (p) =>
            valueOf(s, 'fleetstream_checkpoint_lag_sequences', { processor: p }) === 0 &&
            valueOf(s, 'fleetstream_consumer_pending_messages', { processor: p }) === 0,
        )
      },
      90_000,
      () =>
        s
          .filter((x) => x.name.includes('lag') || x.name.includes('pending'))
          .map((x) => `${x.name}${JSON.stringify(x.labels)} ${x.value}`)
          .join('\n'),
    )
  })

  it('closes the server on SIGTERM and exits 0', async () => {
    proc.child.kill('SIGTERM')
    expect(await proc.exited).toBe(0)
    await expect(fetch(`${base}/healthz`)).rejects.toThrow()
  })

  const status = (...args: string[]) => runCli(['status', '--window', '0.2', ...args], env, 30_000)

  it('status: exits 3 naming the processor when --max-lag is crossed by a backlog', async () => {
    await publishReadings(50) // nobody runs: a backlog
    const r = await status('readings', 'sensor-status', '--max-lag', '0', '--max-dlq', '5')
    expect(r.code, r.output).toBe(3)
    expect(r.output).toContain('thresholds crossed (2):')
    expect(r.output).toMatch(/readings: lag 50 > --max-lag 0/)
    expect(r.output).toMatch(/sensor-status: lag 50 > --max-lag 0/)
    expect(r.output).toContain('FLEET_EVENTS: ')
    expect(r.output).toMatch(/^readings +[\d,]+ +50 +50 +0 +[\d.]+ s ago +3$/m)
    expect(r.output).toContain('DLQ: 6 parked (readings 3, sensor-status 3)')
    expect(r.output).toContain('open alerts: 0')

    const json = await status('--json', '--max-lag', '10')
    expect(json.code, json.output).toBe(3)
    const report = JSON.parse(json.output.split('\n')[0]!) as StatusReport
    const total = published.readings + published.garbage
    expect(report.stream).toMatchObject({ name: 'FLEET_EVENTS', messages: total, lastSeq: total })
    expect(report.stream.ingestPerSecond).toBe(0)
    const readings = report.processors.find((p) => p.name === 'readings')!
    expect(readings).toMatchObject({
      checkpoint: total - 50,
      checkpointLag: 50,
      pending: 50,
      ackPending: 0,
      lag: 50,
      dlqDepth: 3,
    })
    expect(readings.stalenessSeconds).toBeGreaterThan(0)
    // alerts never ran here: everything is ahead of it
    expect(report.processors.find((p) => p.name === 'alerts')).toMatchObject({
      checkpoint: 0,
      lag: total,
      stalenessSeconds: null,
    })
    expect(report.breaches.map((b) => [b.check, b.processor]).sort()).toEqual([
      ['max-lag', 'alerts'],
      ['max-lag', 'readings'],
      ['max-lag', 'sensor-status'],
    ])
    expect(report.openAlerts).toEqual({ critical: 0, warning: 0, info: 0, total: 0 })
  })

  it('status: exits 0 once caught up, and 3 on --max-dlq', async () => {
    const again = spawnCli(['run', 'readings', 'sensor-status', '--no-clock'], env)
    try {
      await waitFor(
        'the backlog to be applied',
        async () => (await rows()) === published.readings,
        60_000,
        again.output,
      )
      let r = { code: -1, output: '' }
      await waitFor(
        'status --max-lag 0 to pass',
        async () => {
          r = await status('readings', 'sensor-status', '--max-lag', '0', '--max-staleness', '60')
          return r.code === 0
        },
        30_000,
        () => r.output,
      )
      expect(r.output).toContain('thresholds: ok')
      const dlq = await status('readings', '--max-dlq', '2')
      expect(dlq.code).toBe(3)
      expect(dlq.output).toContain('readings: 3 in the DLQ > --max-dlq 2')
    } finally {
      again.child.kill('SIGTERM')
      expect(await again.exited).toBe(0)
    }
  })

  it('status: exits 1 with a clear message when NATS cannot be reached, after a bounded wait', async () => {
    const dead = `nats://127.0.0.1:${await freePort()}`
    const r = await runCli(
      ['status', '--timeout', '1'],
      { ...env, NATS_URL: dead, LOG_LEVEL: 'silent' },
      30_000,
    )
    expect(r.code, r.output).toBe(1)
    expect(r.output).toContain(`cannot reach NATS within 1 s: NATS at ${dead}: `)
    expect(r.output).toContain('ECONNREFUSED')
    // Bounded: a retry loop would outlive runCli's 30 s and exit with a signal, not 1.
    const usage = await runCli(['status', '--max-lag', 'many'], env)
    expect(usage.code).not.toBe(0)
    expect(usage.output).toContain("must be an integer >= 0, got 'many'")
  })
})
