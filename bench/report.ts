import type { Latency, Rebuild, StartupAlone } from './fleetstream-phases.ts'

export interface Rate {
  readonly events: number
  readonly seconds: number
  /** Events per second. */
  readonly rate: number
}

/** Everything one `npm run bench` measured; `--json` prints this. */
export interface Figures {
  readonly machine: {
    readonly cores: number
    readonly cpu: string
    readonly node: string
    readonly natsServer: string
    readonly postgres: string
    /** 1-minute load average when the bench started: above the cores, others shared them. */
    readonly loadAtStart: number
  }
  readonly events: number
  /** Sensors the events are spread across (the latency phase's too). */
  readonly devices: number
  readonly payloadBytes: number
  readonly limits: {
    readonly corePublish: Rate
    readonly rawConsume: Rate & {
      readonly natsCpuUsPerEvent: number
      /** CPU of the bench process itself (receiving, acking 1 in 1000). */
      readonly benchCpuUsPerEvent: number
    }
    readonly rawWrite: Rate
    /** (d) the job's write limit: every row of the three read models, by hand (job-limit.ts). */
    readonly jobWrite: Rate & {
      readonly batch: number
      /** Seconds each read model's connection took (they ran at once). */
      readonly perModel: Readonly<Record<string, number>>
      readonly postgresCpuUsPerEvent: number
      /** CPU of the bench process itself (building the COPY payloads). */
      readonly benchCpuUsPerEvent: number
    }
  }
  readonly naive: Rate
  /**
   * (a') ingest's messages (same headers, Nats-Msg-Id, a PubAck each, as many in flight) from a
   * bare-socket publisher that costs next to nothing: what nats-server itself can take in.
   */
  readonly publishCeiling: Rate & {
    /** PubAcks outstanding at most, as in ingest. */
    readonly window: number
    readonly natsCpuUsPerEvent: number
    readonly benchCpuUsPerEvent: number
  }
  readonly fleetstream: {
    readonly ingest: Rate
    /** Each processor started alone on the backlog, before the end-to-end phase. */
    readonly startupAlone: StartupAlone
    readonly endToEnd: Rate & {
      /** Per processor: spawn to its first applied batch (first checkpoint move). */
      readonly startupSeconds: Readonly<Record<string, number>>
      /** Per processor: spawn until caught up with the backlog. */
      readonly caughtUpSeconds: Readonly<Record<string, number>>
      /** CPU per event over the phase: each processor, nats-server, Postgres (all processes). */
      readonly cpuUsPerEvent: Readonly<Record<string, number>>
    }
    readonly latency: Latency & {
      /** Cores each process used while the phase ran (CPU seconds per second). */
      readonly cpuCores: Readonly<Record<string, number>>
      /**
       * Seconds waited before the phase for Postgres to finish what the backlog left it
       * (vacuum, a checkpoint): the phase measures the steady state. Absent in older runs.
       */
      readonly quietSeconds?: number
    }
    readonly rebuild: Readonly<Record<string, Rebuild & { readonly rate: number }>>
    readonly peakRssMb: Readonly<Record<string, number>>
    /** CPU seconds each processor used over its life (end-to-end and latency phases). */
    readonly cpuSeconds: Readonly<Record<string, number>>
    /** How long the processors ran. */
    readonly wallSeconds: number
  }
  /** Rows of each read-model table after the end-to-end phase: processors vs (d). */
  readonly rows: Readonly<Record<string, { readonly processors: number; readonly job: number }>>
  /** The same events on a partitioned stream, with 1 and 2 instances of each processor. */
  readonly scaleOut: {
    readonly partitions: number
    readonly runs: readonly ScaleRun[]
  }
  /** The bench process itself: a 1M run holds every event in memory until the ingest. */
  readonly bench: {
    readonly seconds: number
    readonly peakRssMb: number
    /** 1-minute load average when the bench ended. */
    readonly loadAtEnd: number
  }
}

/** One end-to-end run of the scale-out phase. */
export interface ScaleRun extends Rate {
  /** Processes of each processor, sharing the partitions. */
  readonly instances: number
  readonly startupSeconds: Readonly<Record<string, number>>
  readonly caughtUpSeconds: Readonly<Record<string, number>>
  /** The largest peak RSS among the processes. */
  readonly peakRssMb: number
}

/** One goal of issue 13, judged on this run's figures. */
export interface Goal {
  readonly goal: string
  readonly met: boolean
  /** What this run measured, e.g. `12,345 ev/s (62% of 20,000)`. */
  readonly figure: string
  /** What it had to be, e.g. `>= 10,000 ev/s`. */
  readonly threshold: string
}

/** The size the goals are judged at (issue 13); smaller runs print them for direction only. */
export const JUDGED_EVENTS = 1_000_000
/** The latency goal's load: a steady rate from this many sensors. */
export const JUDGED_RATE = 5000
export const JUDGED_SENSORS = 10_000
/** The publisher "reached" the rate when it sent at least this share of it. */
const REACHED = 0.98

const num = (n: number): string =>
  Number.isFinite(n) ? Math.round(n).toLocaleString('en-US') : String(n)
const pct = (n: number): string => `${(n * 100).toFixed(0)}%`

/**
 * `x` with `digits` decimals, or more where rounding would put it on the other side of the
 * goal's `threshold` (a ratio of 0.8955 is shown as 0.895x, not as 0.90x beside a MISS of >= 0.90x).
 */
export function beside(x: number, threshold: number, digits: number): string {
  let d = digits
  while (d < digits + 3 && x >= threshold !== Number(x.toFixed(d)) >= threshold) d++
  return x.toFixed(d)
}
const secs = (n: number | undefined): string => (n === undefined ? 'never' : `${n.toFixed(2)} s`)

/** min((b) raw consume, (d) the job's write limit): the end-to-end goal's reference. */
export function jobLimit(f: Figures): number {
  return Math.min(f.limits.rawConsume.rate, f.limits.jobWrite.rate)
}

/**
 * The least CPU the end-to-end job can cost per event on this machine, from this run's own
 * limits: Postgres and the client writing the three read models' rows as (d) did, plus three
 * raw consumes of the stream as (b) did (nats-server and client), one per processor. It leaves
 * out everything else a processor does (decoding, validating, checkpoints), so the rate it allows
 * on the machine's cores is an upper bound for any implementation of this job.
 */
export function cpuFloor(f: Figures): { usPerEvent: number; maxRate: number } {
  const d = f.limits.jobWrite
  const b = f.limits.rawConsume
  const usPerEvent =
    d.postgresCpuUsPerEvent +
    d.benchCpuUsPerEvent +
    PROCESSOR_COUNT * (b.natsCpuUsPerEvent + b.benchCpuUsPerEvent)
  return { usPerEvent, maxRate: (f.machine.cores * 1e6) / usPerEvent }
}

/**
 * Cores the end-to-end phase used on average: every process's CPU (the processors, nats-server,
 * Postgres) over the phase's wall time. Below the machine's cores, some stood idle.
 */
function endToEndCores(f: Figures): number {
  const e = f.fleetstream.endToEnd
  const us = Object.values(e.cpuUsPerEvent).reduce((a, b) => a + b, 0)
  return (us * e.events) / 1e6 / e.seconds
}

/** How long the processor caught up last ran after the others had: the phase's tail. */
function lastAlone(caughtUp: Readonly<Record<string, number>>): string {
  const [last, before] = Object.entries(caughtUp).sort(([, a], [, b]) => b - a)
  if (last === undefined || before === undefined) return 'one processor'
  return `${last[0]} ran ${(last[1] - before[1]).toFixed(1)} s after the others had caught up`
}

/** The processors of the end-to-end run, each consuming the whole stream. */
const PROCESSOR_COUNT = 3

/** min((b) raw consume, (c) raw write): the rebuild goal's reference. */
export function rawLimit(f: Figures): number {
  return Math.min(f.limits.rawConsume.rate, f.limits.rawWrite.rate)
}

/** Every goal of issue 13, in its order. */
export function goals(f: Figures): Goal[] {
  const fs = f.fleetstream
  const out: Goal[] = []
  const e2e = fs.endToEnd.rate
  const ref = jobLimit(f)
  out.push({
    goal: 'end to end (3 processors caught up) >= 50% of min((b) raw consume, (d) job write limit)',
    met: e2e >= 0.5 * ref,
    figure: `${num(e2e)} ev/s = ${beside((e2e / ref) * 100, 50, 0)}% of ${num(ref)}`,
    threshold: `>= ${num(0.5 * ref)} ev/s`,
  })
  const floor = cpuFloor(f)
  out.push({
    goal: 'end to end >= 3x naive',
    met: e2e >= 3 * f.naive.rate,
    figure:
      `${beside(e2e / f.naive.rate, 3, 2)}x (${num(e2e)} vs ${num(f.naive.rate)} ev/s; ` +
      `the CPU floor allows at most ${num(floor.maxRate)} ev/s = ${(floor.maxRate / f.naive.rate).toFixed(2)}x)`,
    threshold: '>= 3.00x',
  })
  const raw = rawLimit(f)
  for (const [name, r] of Object.entries(fs.rebuild)) {
    out.push({
      goal: `rebuild ${name} >= 50% of min((b) raw consume, (c) raw write)`,
      met: r.rate >= 0.5 * raw,
      figure: `${num(r.rate)} ev/s = ${beside((r.rate / raw) * 100, 50, 0)}% of ${num(raw)}`,
      threshold: `>= ${num(0.5 * raw)} ev/s`,
    })
  }
  const core = f.limits.corePublish.rate
  const ceiling = f.publishCeiling.rate
  out.push({
    goal: 'ingest (every PubAck checked, dedup ids) >= 65% of (a) core publish',
    met: fs.ingest.rate >= 0.65 * core,
    figure:
      `${num(fs.ingest.rate)} ev/s = ${beside((fs.ingest.rate / core) * 100, 65, 0)}% of ${num(core)}; ` +
      `(a') a publisher that costs nothing reaches ${num(ceiling)} ev/s = ${pct(ceiling / core)}` +
      (ceiling < 0.65 * core ? ': out of reach on this server, whatever the client' : ''),
    threshold: `>= ${num(0.65 * core)} ev/s`,
  })
  const lat = fs.latency
  const reached = lat.rate >= REACHED * JUDGED_RATE
  const asked = lat.targetRate === JUDGED_RATE && f.devices === JUDGED_SENSORS
  out.push({
    goal: `p99 publish -> visible in SQL < 250 ms at a steady ${num(JUDGED_RATE)} ev/s from ${num(JUDGED_SENSORS)} sensors, the publisher reaching it`,
    met: asked && reached && lat.missing === 0 && lat.p99Ms < 250,
    figure:
      `p99 ${lat.p99Ms.toFixed(0)} ms; reached ${num(lat.rate)} of ${num(lat.targetRate)} ev/s asked, ` +
      `${num(f.devices)} sensors` +
      (lat.missing > 0 ? `; ${lat.missing} probes never seen` : ''),
    threshold: `< 250 ms, reached >= ${num(REACHED * JUDGED_RATE)} ev/s`,
  })
  const startup = fs.startupAlone.seconds
  const together = fs.endToEnd.startupSeconds
  const processors = Object.keys(fs.peakRssMb)
  out.push({
    goal: 'start-up of each processor (started alone) to its first applied batch < 1 s on the backlog',
    met: processors.every((p) => (startup[p] ?? Number.POSITIVE_INFINITY) < 1),
    figure:
      processors.map((p) => `${p} ${secs(startup[p])}`).join(', ') +
      ` (all three at once, end-to-end phase: ${processors.map((p) => secs(together[p])).join(' / ')})`,
    threshold: '< 1 s each',
  })
  out.push({
    goal: 'peak RSS of each processor < 250 MB',
    met: processors.every((p) => (fs.peakRssMb[p] ?? Number.POSITIVE_INFINITY) < 250),
    figure: processors
      .map((p) => `${p} ${(fs.peakRssMb[p] ?? Number.NaN).toFixed(0)} MB`)
      .join(', '),
    threshold: '< 250 MB each',
  })
  const runs = f.scaleOut.runs
  const each = runs.filter((r) => r.instances === 1).length
  for (const p of processors) {
    // Same events every time: the rate ratio is the inverse ratio of the times to catch up.
    const t1 = meanCaughtUp(runs, 1, p)
    const t2 = meanCaughtUp(runs, 2, p)
    const x = t1 === undefined || t2 === undefined ? Number.NaN : t1 / t2
    out.push({
      goal: `2 instances of ${p} over ${f.scaleOut.partitions} partitions >= 0.9x of 1 instance`,
      met: x >= 0.9,
      figure:
        `${beside(x, 0.9, 2)}x (caught up in ${secs(t2)} vs ${secs(t1)}` +
        (each > 1 ? `, means of ${each} runs each)` : ')'),
      threshold: '>= 0.90x',
    })
  }
  return out
}

/** The mean time `processor` took to catch up over the scale-out runs with `instances` each. */
function meanCaughtUp(
  runs: readonly ScaleRun[],
  instances: number,
  processor: string,
): number | undefined {
  const times = runs.flatMap((r) => {
    const t = r.instances === instances ? r.caughtUpSeconds[processor] : undefined
    return t === undefined ? [] : [t]
  })
  return times.length === 0 ? undefined : times.reduce((a, b) => a + b, 0) / times.length
}

export function printReport(f: Figures, json: boolean): void {
  const out = (line = ''): void => {
    process.stdout.write(`${line}\n`)
  }
  const judged = f.events >= JUDGED_EVENTS
  if (json) {
    out(JSON.stringify({ ...f, judged, goals: goals(f) }, null, 2))
    return
  }
  const fs = f.fleetstream
  const ref = jobLimit(f)
  const raw = rawLimit(f)
  const rows: string[][] = []
  const rate = (
    group: string,
    what: string,
    r: Rate,
    vsLimit: number | undefined,
    vsNaive: number | undefined,
    note = '',
  ): void => {
    rows.push([
      group,
      what,
      num(r.events),
      r.seconds.toFixed(2),
      num(r.rate),
      vsLimit === undefined ? '' : pct(vsLimit),
      vsNaive === undefined ? '' : `${vsNaive.toFixed(1)}x`,
      note,
    ])
  }
  const other = (group: string, what: string, value: string, note = ''): void => {
    rows.push([group, what, '', '', value, '', '', note])
  }
  rate(
    'limits',
    '(a) core NATS publish, no acks',
    f.limits.corePublish,
    undefined,
    undefined,
    'until the stream stored all',
  )
  rate(
    '',
    '(b) raw JetStream consume, AckPolicy.All',
    f.limits.rawConsume,
    undefined,
    undefined,
    `ack 1 in 1000; nats-server ${num(f.limits.rawConsume.natsCpuUsPerEvent)}, ` +
      `client ${num(f.limits.rawConsume.benchCpuUsPerEvent)} us CPU/event`,
  )
  rate(
    '',
    '(c) raw Postgres unnest INSERT',
    f.limits.rawWrite,
    undefined,
    undefined,
    'readings only, 1000 rows/statement, 1 connection',
  )
  const job = f.limits.jobWrite
  rate(
    '',
    "(d) the job's write limit, 3 read models",
    job,
    undefined,
    undefined,
    `COPY + INSERT..SELECT..ON CONFLICT, ${num(job.batch)}/tx, 3 connections at once ` +
      `(${Object.entries(job.perModel)
        .map(([m, t]) => `${m} ${t.toFixed(1)} s`)
        .join(', ')}); Postgres ${num(job.postgresCpuUsPerEvent)}, ` +
      `client ${num(job.benchCpuUsPerEvent)} us CPU/event`,
  )
  const ceil = f.publishCeiling
  rate(
    '',
    "(a') JetStream publish ceiling, bare socket",
    ceil,
    ceil.rate / f.limits.corePublish.rate,
    undefined,
    `vs (a); ingest's headers, msgID and PubAcks, ${num(ceil.window)} in flight, no consumer; ` +
      `nats-server ${num(ceil.natsCpuUsPerEvent)}, client ${num(ceil.benchCpuUsPerEvent)} us CPU/event`,
  )
  rate('naive', 'consume, INSERT per row, ack each', f.naive, undefined, 1)
  rate(
    'fleetstream',
    'ingest (PublishPipeline, PubAcks)',
    fs.ingest,
    fs.ingest.rate / f.limits.corePublish.rate,
    undefined,
    `vs (a); ${num(ceil.window)} in flight, as (a')`,
  )
  rate(
    '',
    'end-to-end, 3 processor processes',
    fs.endToEnd,
    fs.endToEnd.rate / ref,
    fs.endToEnd.rate / f.naive.rate,
    'vs min(b,d); until all 3 caught up, start-up included',
  )
  for (const [name, t] of Object.entries(fs.endToEnd.caughtUpSeconds)) {
    const cpu = fs.endToEnd.cpuUsPerEvent[name] ?? Number.NaN
    other(
      '',
      `  ${name}`,
      `${num(fs.endToEnd.events / t)}/s`,
      `caught up in ${secs(t)}; first batch at ${secs(fs.endToEnd.startupSeconds[name])}; ` +
        `${num(cpu)} us CPU/event; peak RSS ${(fs.peakRssMb[name] ?? Number.NaN).toFixed(0)} MB`,
    )
  }
  const cpu = fs.endToEnd.cpuUsPerEvent
  other(
    '',
    'CPU per applied event, end-to-end phase',
    `${num(Object.values(cpu).reduce((a, b) => a + b, 0))} us`,
    Object.entries(cpu)
      .map(([k, v]) => `${k} ${num(v)}`)
      .join(', ') + ' (us; Postgres: all its processes)',
  )
  other(
    '',
    'cores used, end-to-end phase',
    `${endToEndCores(f).toFixed(2)} of ${f.machine.cores}`,
    `on average; ${lastAlone(fs.endToEnd.caughtUpSeconds)}`,
  )
  const floor = cpuFloor(f)
  other(
    '',
    'CPU floor of the job, per event',
    `${num(floor.usPerEvent)} us`,
    `(d)'s Postgres + client, 3x (b)'s nats-server + client: at most ${num(floor.maxRate)} ev/s ` +
      `on ${f.machine.cores} cores, whatever the implementation`,
  )
  const differ = Object.entries(f.rows).filter(([, r]) => r.processors !== r.job)
  other(
    '',
    "rows vs (d)'s",
    differ.length === 0 ? 'same' : 'DIFFER',
    differ.length === 0
      ? `${Object.keys(f.rows).length} tables, same row counts`
      : differ.map(([t, r]) => `${t} ${num(r.processors)} vs ${num(r.job)}`).join(', '),
  )
  for (const [name, r] of Object.entries(fs.rebuild)) {
    rate(
      '',
      `rebuild ${name}`,
      { events: r.applied, seconds: r.seconds, rate: r.rate },
      r.rate / raw,
      r.rate / f.naive.rate,
      'vs min(b,c)',
    )
  }
  const lat = fs.latency
  other(
    '',
    `publish->SQL p50 / p99 / max`,
    `${lat.p50Ms.toFixed(0)} / ${lat.p99Ms.toFixed(0)} / ${lat.maxMs.toFixed(0)} ms`,
    `reached ${num(lat.rate)} of ${num(lat.targetRate)} ev/s asked, ${num(f.devices)} sensors, ` +
      `${num(lat.samples)} probes, ${lat.missing} missing, poll ${lat.pollMs} ms` +
      (lat.quietSeconds === undefined
        ? ''
        : `; after ${lat.quietSeconds.toFixed(1)} s of vacuum and a checkpoint of the backlog`) +
      (lat.warmupSeconds === undefined ? '' : ` and ${lat.warmupSeconds} s at the rate unmeasured`),
  )
  const cores = Object.entries(lat.cpuCores)
  other(
    '',
    'cores used, latency phase',
    `${cores.reduce((n, [, c]) => n + c, 0).toFixed(2)} of ${f.machine.cores}`,
    cores.map(([k, c]) => `${k} ${c.toFixed(2)}`).join(', '),
  )
  other(
    '',
    'start-up alone (first batch)',
    Object.values(fs.startupAlone.seconds)
      .map((t) => t.toFixed(2))
      .join(' / ') + ' s',
    `${Object.keys(fs.startupAlone.seconds).join(' / ')}: each spawned alone on the backlog, ` +
      'stopped after its first applied batch, before the end-to-end phase',
  )
  for (const [name, mb] of Object.entries(fs.peakRssMb)) {
    other(
      '',
      `peak RSS ${name}`,
      `${mb.toFixed(0)} MB`,
      `VmHWM; ${(fs.cpuSeconds[name] ?? Number.NaN).toFixed(1)} CPU s in ${fs.wallSeconds.toFixed(1)} s`,
    )
  }

  const singles = f.scaleOut.runs.filter((r) => r.instances === 1)
  const singleRate = singles.reduce((sum, r) => sum + r.rate, 0) / singles.length
  f.scaleOut.runs.forEach((r, i) => {
    rate(
      i === 0 ? 'scale-out' : '',
      `end-to-end, ${f.scaleOut.partitions} partitions, ${r.instances} instance${r.instances === 1 ? '' : 's'} each`,
      r,
      r.rate / ref,
      r.rate / f.naive.rate,
      `${r.instances * 3} processes; caught up: ` +
        Object.entries(r.caughtUpSeconds)
          .map(([p, t]) => `${p} ${t.toFixed(1)} s`)
          .join(', ') +
        `; peak RSS ${r.peakRssMb.toFixed(0)} MB` +
        (r.instances > 1 && singles.length > 0
          ? `; ${(r.rate / singleRate).toFixed(2)}x 1 instance (mean of ${singles.length})`
          : ''),
    )
  })
  other(
    'bench',
    'the bench process itself',
    `${f.bench.peakRssMb.toFixed(0)} MB`,
    `peak RSS (holds every event until the ingest); ${f.bench.seconds.toFixed(0)} s in all`,
  )

  const head = ['', 'measure', 'events', 'seconds', 'events/s', 'vs limit', 'vs naive', 'note']
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)))
  const right = new Set([2, 3, 4, 5, 6])
  const line = (cells: readonly string[]): string =>
    cells
      .map((c, i) => (right.has(i) ? c.padStart(widths[i] ?? 0) : c.padEnd(widths[i] ?? 0)))
      .join('  ')
      .trimEnd()
  const m = f.machine
  out(
    `machine: ${m.cores} cores (${m.cpu}), node ${m.node}, nats-server ${m.natsServer}, postgres ${m.postgres}`,
  )
  const busy = Math.max(m.loadAtStart, f.bench.loadAtEnd) > m.cores
  out(
    `load average: ${m.loadAtStart.toFixed(1)} at the start, ${f.bench.loadAtEnd.toFixed(1)} at the end` +
      (busy ? ` (BUSY: more than ${m.cores}; the figures do not compare with an idle run)` : ''),
  )
  out(`payload: ${num(f.events)} reading events, ${f.payloadBytes} bytes of JSON each on average`)
  out()
  out(line(head))
  out(line(widths.map((w) => '-'.repeat(w))))
  for (const r of rows) out(line(r))
  out()
  const gs = goals(f)
  out(
    judged
      ? `goals of issue 13 (judged: ${num(f.events)} events): ${gs.filter((g) => g.met).length}/${gs.length} met`
      : `goals of issue 13: NOT JUDGED, this run had ${num(f.events)} events; they are judged at ` +
          `--events ${num(JUDGED_EVENTS)} (${gs.filter((g) => g.met).length}/${gs.length} would be met)`,
  )
  for (const g of gs) {
    out(`  ${g.met ? 'MET ' : 'MISS'}  ${g.goal}`)
    out(`        ${g.figure}; threshold ${g.threshold}`)
  }
}
