/**
 * `npm run bench`: fleetstream against the raw limits of this machine and against a naive
 * consumer, measured in one run with the same payloads, on throwaway nats-server and Postgres.
 *
 * ```sh
 * npm run bench                      # 20,000 events, about a minute
 * npm run bench -- --events 1000000  # the full run
 * npm run bench -- --json            # the figures as JSON on stdout
 * ```
 */
import { OperatorError } from '../schemas/errors.ts'
import { availableParallelism, cpus, loadavg } from 'node:os'
import { parseArgs } from 'node:util'
import { JetStreamApiCodes, JetStreamApiError } from '@nats-io/jetstream'
import { connect } from '@nats-io/transport-node'
import pg from 'pg'
import { openRuntime, setUp, type Runtime } from '../app/runtime.ts'
import { loadConfig } from '../infra/config.ts'
import { createLogger } from '../infra/logger.ts'
import { createPublisher } from '../infra/publisher.ts'
import { slotsOf } from '../processors/partitions.ts'
import { PROCESSOR_NAMES } from '../processors/processor-registry.ts'
import { HybridLogicalClock } from '../schemas/hlc.ts'
import { partitionMapping } from '../schemas/subjects.ts'
import { startNatsServer, type NatsServer } from '../testbed/nats-server.ts'
import { startPostgres, type PgCluster } from '../testbed/postgres.ts'
import { HarnessError } from '../testbed/processes.ts'
import { createKysely, createPool } from '../infra/database.ts'
import { defaultAlertRulesPath, loadAlertRules } from '../infra/alert-rules-file.ts'
import type { ThresholdRule } from '../projections/alert-rules.ts'
import { migrateToLatest } from '../projections/migrate.ts'
import {
  type BenchEvent,
  BenchError,
  type Child,
  cpuSeconds,
  note,
  parentPid,
  peakRssMb,
  stampReading,
  treeCpuSeconds,
} from './common.ts'
import { jobWrite, tableRows } from './job-limit.ts'
import {
  endToEnd,
  ingest,
  latency,
  rebuild,
  startupAlone,
  stopProcessors,
  WINDOW,
  type Rebuild,
} from './fleetstream-phases.ts'
import {
  corePublish,
  createRawStream,
  createScratchTables,
  naive,
  RAW_PREFIX,
  RAW_STREAM,
  rawConsume,
  rawWrite,
} from './limits.ts'
import { publishCeiling } from './publish-ceiling.ts'
import { quietPostgres } from './quiet-postgres.ts'
import { collectGarbage } from './collect-garbage.ts'
import { type Figures, printReport, type ScaleRun } from './report.ts'

/**
 * How long a processor phase may take before the bench gives up: at least 30 minutes, and 250
 * events/s at worst (a 1M run on a machine whose two cores other work shares too).
 */
function phaseTimeoutMs(events: number): number {
  return Math.max(30 * 60_000, events * 4)
}

/**
 * Seconds the latency phase publishes at its rate before it measures. Measured after a 1M
 * catch-up (rig, three 15-s rounds back to back, Postgres vacuumed first): p99 195-325 ms in the
 * first round, 107-139 ms in the next, the same code and rate: the processors' heaps from the
 * backlog are collected in the first seconds of a lighter load.
 */
const LATENCY_WARMUP_SECONDS = 5

/** From this many events on, the defaults are those of a full run. */
const FULL_RUN_EVENTS = 200_000

const USAGE = `usage: npm run bench -- [--events N] [--naive-events N] [--latency-seconds S] [--latency-rate R] [--devices N] [--partitions N] [--scale-events N] [--json]`

interface Options {
  events: number
  naiveEvents: number
  latencySeconds: number
  latencyRate: number
  devices: number
  /** Partitions of the scale-out phase's stream. */
  partitions: number
  /** Events of the scale-out phase (1 and 2 instances of each processor). */
  scaleEvents: number
  json: boolean
}

function parseOptions(argv: readonly string[]): Options {
  const { values } = parseArgs({
    args: [...argv],
    options: {
      events: { type: 'string', default: '20000' },
      'naive-events': { type: 'string' },
      'latency-seconds': { type: 'string' },
      'latency-rate': { type: 'string', default: '5000' },
      devices: { type: 'string', default: '10000' },
      partitions: { type: 'string', default: '4' },
      'scale-events': { type: 'string' },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', default: false },
    },
  })
  if (values.help) {
    process.stdout.write(`${USAGE}\n`)
    process.exit(0)
  }
  const int = (name: string, v: string | undefined, min: number): number => {
    const n = Number(v)
    if (!Number.isInteger(n) || n < min) {
      throw new UsageError(`'--${name}' must be an integer >= ${min}, got '${String(v)}'`)
    }
    return n
  }
  const events = int('events', values.events, 1000)
  return {
    events,
    naiveEvents: Math.min(
      events,
      int('naive-events', values['naive-events'] ?? String(Math.min(events, 10_000)), 100),
    ),
    // The quick default keeps the whole run near a minute; a full run measures latency longer.
    latencySeconds: int(
      'latency-seconds',
      values['latency-seconds'] ?? (events >= FULL_RUN_EVENTS ? '15' : '6'),
      1,
    ),
    latencyRate: int('latency-rate', values['latency-rate'], 1),
    devices: int('devices', values.devices, 1),
    partitions: int('partitions', values.partitions, 1),
    scaleEvents: Math.min(
      events,
      int(
        'scale-events',
        values['scale-events'] ?? String(Math.max(10_000, Math.round(events / 5))),
        1000,
      ),
    ),
    json: values.json,
  }
}

const rate = (events: number, seconds: number): string =>
  `${Math.round(events / seconds).toLocaleString('en-US')} ev/s`

class UsageError extends OperatorError {}

async function main(opts: Options): Promise<Figures> {
  let nats: NatsServer | undefined
  let pgc: PgCluster | undefined
  let rt: Runtime | undefined
  let processors: readonly Child[] = []
  let jobPool: pg.Pool | undefined
  let rawPool: pg.Pool | undefined
  const benchStart = performance.now()
  try {
    const loadAtStart = loadavg()[0] ?? Number.NaN
    if (loadAtStart > availableParallelism()) {
      note(
        `the machine is busy (load average ${loadAtStart.toFixed(1)} on ${availableParallelism()} cores): ` +
          'figures will not compare with an idle run',
      )
    }
    note('starting a throwaway nats-server and Postgres')
    // Both at once; whichever started is cleaned up below if the other did not.
    const [n, p] = await Promise.allSettled([startNatsServer(), startPostgres()])
    if (n.status === 'fulfilled') nats = n.value
    if (p.status === 'fulfilled') pgc = p.value
    if (n.status === 'rejected') throw n.reason
    if (p.status === 'rejected') throw p.reason
    if (nats === undefined || pgc === undefined) throw new BenchError('servers did not start')
    const databaseUrl = await pgc.createDatabase('bench')
    const env = {
      NATS_URL: nats.url,
      DATABASE_URL: databaseUrl,
      LOG_LEVEL: 'warn',
      METRICS_PORT: '0',
      METRICS_HOST: '127.0.0.1',
    }
    const config = loadConfig(env)
    rt = await openRuntime(config, createLogger({ level: 'silent', name: 'bench' }), {
      name: 'fleetstream-bench',
    })
    await setUp(rt)
    // What the bench's own SQL goes through ((c), the naive consumer, the latency phase's poller):
    // a connection as a raw user would open it, every statement unnamed (node-postgres' default),
    // as in the runs before fleetstream named its repeated statements.
    rawPool = new pg.Pool({ connectionString: databaseUrl, max: 2 })
    const backendPid = (await rt.pool.query<{ pid: number }>('select pg_backend_pid() as pid'))
      .rows[0]?.pid
    if (backendPid === undefined) throw new BenchError('no pg_backend_pid()')
    const postmaster = parentPid(backendPid)
    // (d)'s scratch database, migrated with fleetstream's own migrations.
    const jobUrl = await pgc.createDatabase('bench_job')
    jobPool = createPool(jobUrl, { log: createLogger({ level: 'silent', name: 'bench' }), max: 2 })
    await migrateToLatest(createKysely(jobPool))
    const thresholdRules = (
      await loadAlertRules(config.alertRulesFile ?? defaultAlertRulesPath())
    ).rules.filter((r): r is ThresholdRule => r.kind === 'threshold')
    const postgresVersion = (
      await rt.pool.query<{ v: string }>("select current_setting('server_version') as v")
    ).rows[0]?.v
    const machine = {
      cores: availableParallelism(),
      cpu: cpus()[0]?.model ?? 'unknown',
      node: process.version,
      natsServer: rt.nc.info?.version ?? 'unknown',
      postgres: postgresVersion ?? 'unknown',
      loadAtStart,
    }

    const publisher = createPublisher(rt.js, {
      clock: new HybridLogicalClock({ node: 'bench', maxOffsetMs: 500 }),
    })
    note(`stamping ${opts.events} reading events across ${opts.devices} sensors`)
    const events: BenchEvent[] = []
    for (let i = 0; i < opts.events; i++) events.push(stampReading(publisher, i, opts.devices))
    const bytes = events.reduce((n, e) => n + Buffer.byteLength(e.body), 0)

    // Limits: a separate connection as a raw user would open it.
    const raw = await connect({ servers: nats.url, noAsyncTraces: true, name: 'bench-raw' })
    let limits: Figures['limits']
    let naiveResult: Figures['naive']
    let ceiling: Figures['publishCeiling']
    try {
      await createRawStream(rt.jsm, config.streams.events)
      note('(a) core NATS publish')
      const a = await corePublish(raw, rt.jsm, events)
      note('(b) raw JetStream consume, AckPolicy.All')
      const natsCpuB0 = cpuSeconds(nats.pid)
      const benchCpuB0 = cpuSeconds(process.pid)
      const b = await rawConsume(raw, rt.jsm, a.stored)
      const natsCpuB = cpuSeconds(nats.pid) - natsCpuB0
      const benchCpuB = cpuSeconds(process.pid) - benchCpuB0
      note('(c) raw set-based Postgres write')
      await createScratchTables(rawPool)
      const c = await rawWrite(rawPool, events)
      note("(d) the job's write limit: the three read models' rows by hand, 3 connections at once")
      const pgCpu0 = treeCpuSeconds(postmaster)
      const benchCpu0 = cpuSeconds(process.pid)
      const d = await jobWrite(jobUrl, events, thresholdRules)
      const pgCpuD = treeCpuSeconds(postmaster) - pgCpu0
      const benchCpuD = cpuSeconds(process.pid) - benchCpu0
      note(
        `(a) ${rate(a.stored, a.seconds)}, (b) ${rate(a.stored, b.seconds)}, ` +
          `(c) ${rate(events.length, c.seconds)}, (d) ${rate(events.length, d.seconds)}`,
      )
      limits = {
        corePublish: { events: a.stored, seconds: a.seconds, rate: a.stored / a.seconds },
        rawConsume: {
          events: a.stored,
          seconds: b.seconds,
          rate: a.stored / b.seconds,
          natsCpuUsPerEvent: (natsCpuB * 1e6) / a.stored,
          benchCpuUsPerEvent: (benchCpuB * 1e6) / a.stored,
        },
        rawWrite: { events: events.length, seconds: c.seconds, rate: events.length / c.seconds },
        jobWrite: {
          events: events.length,
          seconds: d.seconds,
          rate: events.length / d.seconds,
          batch: d.batch,
          perModel: d.perModel,
          postgresCpuUsPerEvent: (pgCpuD * 1e6) / events.length,
          benchCpuUsPerEvent: (benchCpuD * 1e6) / events.length,
        },
      }
      note(`naive consumer on ${opts.naiveEvents} events`)
      const n = await naive(raw, rt.jsm, rawPool, opts.naiveEvents)
      naiveResult = {
        events: opts.naiveEvents,
        seconds: n.seconds,
        rate: opts.naiveEvents / n.seconds,
      }
      note("(a') the JetStream publish ceiling: ingest's messages from a bare socket")
      // No consumer on the stream (ingest's has the processors'): the ceiling errs high.
      for await (const c of rt.jsm.consumers.list(RAW_STREAM)) {
        await rt.jsm.consumers.delete(RAW_STREAM, c.name)
      }
      const target = {
        natsUrl: nats.url,
        natsPid: nats.pid,
        jsm: rt.jsm,
        stream: RAW_STREAM,
        subjectPrefix: RAW_PREFIX,
      }
      const j = await publishCeiling(target, events, WINDOW)
      ceiling = {
        events: events.length,
        seconds: j.seconds,
        rate: events.length / j.seconds,
        window: WINDOW,
        natsCpuUsPerEvent: (j.natsCpuSeconds * 1e6) / events.length,
        benchCpuUsPerEvent: (j.clientCpuSeconds * 1e6) / events.length,
      }
      await rt.jsm.streams.delete(RAW_STREAM)
      await rawPool.query('drop table bench_raw, bench_naive')
    } finally {
      await raw.close()
    }

    note('fleetstream ingest (PublishPipeline, every PubAck checked)')
    const ing = await ingest(publisher, events)
    note(`ingest: ${rate(ing.stored, ing.seconds)}`)
    if (ing.stored !== events.length) {
      throw new BenchError(`ingest stored ${ing.stored} of ${events.length} events`)
    }
    // From here on no phase needs these events: the scale-out phase stamps its own. Kept (2 GB at
    // 1M events; 400 MB for the scale-out's first 200k alone) they would stay live in this
    // process through every processor phase, and each full GC of them (V8's memory reducer runs
    // them while this thread idles) takes CPU from the processors and, in the latency phase,
    // pauses the publisher and the poller: the phase's p99 was 227-387 ms in 1M runs holding the
    // scale-out's 200k, 87-144 ms in rigs holding none. Dropped, they are freed here, not in a
    // later phase (bench/collect-garbage.ts).
    events.splice(0)
    note(`the bench's garbage collected in ${collectGarbage().toFixed(0)} ms`)
    note('start-up: each processor alone on the backlog, until its first applied batch')
    const alone = await startupAlone(rt, env, phaseTimeoutMs(opts.events))
    note(
      'start-up alone: ' +
        Object.entries(alone.seconds)
          .map(([p, t]) => `${p} ${t.toFixed(2)} s`)
          .join(', '),
    )
    // Each took a head start on the backlog; the end-to-end rate counts only what was left for
    // the phase (the largest head start off every processor's share: the rate errs low).
    const e2eEvents = opts.events - Math.max(0, ...Object.values(alone.applied))
    note('end to end: three processor processes on the backlog')
    const processorsStarted = performance.now() / 1000
    const natsCpu0 = cpuSeconds(nats.pid)
    const pgCpu0 = treeCpuSeconds(postmaster)
    const e2e = await endToEnd(rt, env, phaseTimeoutMs(opts.events))
    processors = e2e.children
    const natsCpu = cpuSeconds(nats.pid) - natsCpu0
    const pgCpu = treeCpuSeconds(postmaster) - pgCpu0
    note(
      `end to end: ${rate(e2eEvents, e2e.seconds)}; first batch at ` +
        Object.entries(e2e.startupSeconds)
          .map(([p, t]) => `${p} ${t.toFixed(2)} s`)
          .join(', '),
    )
    const perEvent = (cpu: number): number => (cpu * 1e6) / e2eEvents
    const cpuUsPerEvent: Record<string, number> = {
      ...Object.fromEntries(Object.entries(e2e.cpuSeconds).map(([k, v]) => [k, perEvent(v)])),
      'nats-server': perEvent(natsCpu),
      postgres: perEvent(pgCpu),
    }
    // Same workload, same rows: (d) is a limit for this job only if it wrote what the processors did.
    const [byProcessors, byJob] = await Promise.all([tableRows(rt.pool), tableRows(jobPool)])
    const rows = Object.fromEntries(
      Object.entries(byProcessors).map(([t, n]) => [t, { processors: n, job: byJob[t] ?? 0 }]),
    )
    await jobPool.end()
    jobPool = undefined
    // The latency goal is the steady state's: Postgres first finishes what the backlog left it
    // (the vacuum and statistics of the tables the processors just wrote, dirty pages), as before
    // each scale-out run. Measured after a 1M catch-up: autovacuum ran VACUUM ANALYZE of readings
    // for ~3 s, then of alert_inputs for over 11 s, on one of the two cores the whole 15-s phase
    // long, starting up to ~6 s after the catch-up (so waiting for its workers alone could miss
    // it); run here at once, as after any bulk load. How long it took is shown.
    const quietStart = performance.now()
    await rt.pool.query('vacuum (analyze)')
    const stillBusy = await quietPostgres(pgc, [])
    const quietSeconds = (performance.now() - quietStart) / 1000
    // And this process's own, left while it waited for the processors (bench/collect-garbage.ts).
    collectGarbage()
    if (stillBusy.length > 0) note(`latency: autovacuum still running (${stillBusy.join('; ')})`)
    note(
      `latency: ${opts.latencyRate} events/s from ${opts.devices} sensors for ${opts.latencySeconds} s, ` +
        `after ${quietSeconds.toFixed(1)} s of Postgres catching up (vacuum, checkpoint) and ` +
        `${LATENCY_WARMUP_SECONDS} s at the rate unmeasured`,
    )
    // What each process used of the cores while the phase ran: the processors, the servers, and
    // this process (the publisher and the poller).
    const natsPid = nats.pid
    const cpuNow = (): Record<string, number> => ({
      ...Object.fromEntries(processors.map((c) => [c.name, cpuSeconds(c.pid)])),
      'nats-server': cpuSeconds(natsPid),
      postgres: treeCpuSeconds(postmaster),
      'bench (publisher, poller)': cpuSeconds(process.pid),
    })
    const latCpu0 = cpuNow()
    const latStart = performance.now()
    const lat = await latency(rawPool, publisher, {
      rate: opts.latencyRate,
      devices: opts.devices,
      seconds: opts.latencySeconds,
      warmupSeconds: LATENCY_WARMUP_SECONDS,
      firstIndex: opts.events,
    })
    const latWall = (performance.now() - latStart) / 1000
    const cpuCores = Object.fromEntries(
      Object.entries(cpuNow()).map(([k, v]) => [k, (v - (latCpu0[k] ?? 0)) / latWall]),
    )
    note(`latency: p99 ${lat.p99Ms.toFixed(0)} ms, reached ${Math.round(lat.rate)} ev/s`)
    const processorsRan = performance.now() / 1000 - processorsStarted
    const usage = await stopProcessors(processors)
    processors = []

    const backlog = (await rt.jsm.streams.info(config.streams.events)).state.messages
    note(`rebuilds on the backlog of ${backlog} events`)
    const rebuilds: Record<string, Rebuild & { rate: number }> = {}
    for (const name of PROCESSOR_NAMES) {
      const r = await rebuild(name, env, phaseTimeoutMs(opts.events))
      rebuilds[name] = { ...r, rate: r.applied / r.seconds }
    }

    note(
      `scale-out: ${opts.scaleEvents} events over ${opts.partitions} partitions; 1, then 2 instances of each processor`,
    )
    // The phases before are done with their databases: the scale-out runs drop them first, so
    // every connection to them is closed here. An idle one left in a pool was terminated by the
    // drop, and its pool's 'error' ended the bench (a quick run, whose rebuilds took less than
    // the pool's 10-s idle timeout).
    await rt.close()
    rt = undefined
    await rawPool.end()
    rawPool = undefined
    // The same workload's first --scale-events readings, stamped again (new ids and HLCs) for
    // the phase's one ingest and dropped after it: no run of it shares the cores with a GC of them.
    const scale = await scaleOut(
      pgc,
      opts.scaleEvents,
      () =>
        Array.from({ length: opts.scaleEvents }, (_, i) =>
          stampReading(publisher, i, opts.devices),
        ),
      opts.partitions,
      ['bench', 'bench_job'],
    )

    return {
      machine,
      events: opts.events,
      devices: opts.devices,
      payloadBytes: Math.round(bytes / opts.events),
      limits,
      naive: naiveResult,
      publishCeiling: ceiling,
      fleetstream: {
        ingest: { events: ing.stored, seconds: ing.seconds, rate: ing.stored / ing.seconds },
        startupAlone: alone,
        endToEnd: {
          events: e2eEvents,
          seconds: e2e.seconds,
          rate: e2eEvents / e2e.seconds,
          startupSeconds: e2e.startupSeconds,
          caughtUpSeconds: e2e.caughtUpSeconds,
          cpuUsPerEvent,
        },
        latency: { ...lat, cpuCores, quietSeconds },
        rebuild: rebuilds,
        peakRssMb: usage.rssMb,
        cpuSeconds: usage.cpuSeconds,
        wallSeconds: processorsRan,
      },
      rows,
      scaleOut: scale,
      bench: {
        seconds: (performance.now() - benchStart) / 1000,
        peakRssMb: peakRssMb(process.pid),
        loadAtEnd: loadavg()[0] ?? Number.NaN,
      },
    }
  } finally {
    await Promise.all(processors.map((c) => c.stop(2000)))
    await jobPool?.end().catch(() => undefined)
    await rawPool?.end().catch(() => undefined)
    await rt?.close().catch(() => undefined)
    await Promise.all([
      nats?.cleanup().catch(() => undefined),
      pgc?.cleanup().catch(() => undefined),
    ])
  }
}

/**
 * Instances of each processor in the scale-out's runs, in order. The goal compares the means of
 * each count: the VM's speed drifts by 10-15% within minutes here, and two back-to-back pairs of
 * the same code gave readings 1.12x and 0.84x; in this order a steady drift weighs on both alike.
 */
const SCALE_RUNS = [1, 2, 2, 1] as const

/**
 * `count` events (`stamp` makes them, once, for the ingest) on a stream split into partitions by
 * the server's subject mapping, processed end to end by one process of each processor (owning
 * every partition) or by two of each sharing the partitions, as {@link SCALE_RUNS} says, each run
 * into a fresh database. Each run starts on a quiet Postgres (bench/quiet-postgres.ts): the
 * databases before it (`done`, then the previous run's) dropped.
 */
async function scaleOut(
  pgc: PgCluster,
  count: number,
  stamp: () => readonly BenchEvent[],
  partitions: number,
  done: readonly string[],
): Promise<Figures['scaleOut']> {
  const m = partitionMapping(partitions)
  const nats = await startNatsServer({
    extraConfig: `mappings: { ${JSON.stringify(m.from)}: ${JSON.stringify(m.to)} }`,
  })
  const runs: ScaleRun[] = []
  let rt: Runtime | undefined
  let children: readonly Child[] = []
  try {
    let drop = done
    for (const [k, instances] of SCALE_RUNS.entries()) {
      const busy = await quietPostgres(pgc, drop)
      if (busy.length > 0) note(`scale-out: autovacuum still running (${busy.join('; ')})`)
      const database = `bench_scale_${k + 1}_${instances}`
      drop = [database]
      const env = {
        NATS_URL: nats.url,
        DATABASE_URL: await pgc.createDatabase(database),
        LOG_LEVEL: 'warn',
        METRICS_PORT: '0',
        METRICS_HOST: '127.0.0.1',
        FLEET_PARTITIONS: String(partitions),
      }
      rt = await openRuntime(loadConfig(env), createLogger({ level: 'silent', name: 'bench' }), {
        name: 'fleetstream-bench',
      })
      await setUp(rt)
      if (k === 0) {
        const publisher = createPublisher(rt.js, {
          clock: new HybridLogicalClock({ node: 'bench', maxOffsetMs: 500 }),
        })
        const ing = await ingest(publisher, stamp())
        if (ing.stored !== count) {
          throw new BenchError(`scale-out ingest stored ${ing.stored} of ${count} events`)
        }
        // The events just ingested are garbage: freed now, not beside one run and not the others.
        collectGarbage()
      }
      note(`scale-out: ${instances} instance(s) of each processor`)
      const e2e = await endToEnd(rt, env, phaseTimeoutMs(count), instances)
      children = e2e.children
      const usage = await stopProcessors(children)
      children = []
      // Each run is a fresh deployment: its own database and the consumers `setup` creates for
      // it. Left for the next run (acked to the end of the stream), each of its slot sessions
      // would recreate one: two more JetStream API requests per slot, ~90 ms of nats-server 2.9's
      // one API queue each on this stream, charged to the later runs only.
      await dropConsumers(rt)
      runs.push({
        instances,
        events: count,
        seconds: e2e.seconds,
        rate: count / e2e.seconds,
        startupSeconds: e2e.startupSeconds,
        caughtUpSeconds: e2e.caughtUpSeconds,
        peakRssMb: Math.max(...Object.values(usage.rssMb)),
      })
      await rt.close()
      rt = undefined
    }
  } finally {
    await Promise.all(children.map((c) => c.stop(2000)))
    await rt?.close().catch(() => undefined)
    await nats.cleanup().catch(() => undefined)
  }
  return { partitions, runs }
}

/** Deletes the processors' durable consumers of the events stream (those there are). */
async function dropConsumers(rt: Runtime): Promise<void> {
  for (const name of PROCESSOR_NAMES) {
    for (const slot of slotsOf(rt.processors[name], rt.config)) {
      await rt.jsm.consumers.delete(rt.config.streams.events, slot.key).catch((err: unknown) => {
        if (!(err instanceof JetStreamApiError && err.code === JetStreamApiCodes.ConsumerNotFound))
          throw err
      })
    }
  }
}

let opts: Options
try {
  opts = parseOptions(process.argv.slice(2))
} catch (err) {
  process.stderr.write(`bench: ${(err as Error).message}\n${USAGE}\n`)
  process.exit(2)
}
try {
  const figures = await main(opts)
  printReport(figures, opts.json)
} catch (err) {
  const e = err as Error
  const known = e instanceof HarnessError || e instanceof BenchError
  process.stderr.write(`bench failed: ${known ? e.message : (e.stack ?? e.message)}\n`)
  process.exitCode = 1
}
