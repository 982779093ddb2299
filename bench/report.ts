import type { Latency, Rebuild } from './fleetstream.ts'

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
  }
  readonly events: number
  readonly payloadBytes: number
  readonly limits: {
    readonly corePublish: Rate
    readonly rawConsume: Rate
    readonly rawWrite: Rate
  }
  readonly naive: Rate
  /** Raw js.publish with Nats-Msg-Id, as many in flight as fleetstream: where ingest's time goes. */
  readonly jsPublish: Rate
  readonly fleetstream: {
    readonly ingest: Rate
    readonly endToEnd: Rate & { readonly startupSeconds: number }
    readonly latency: Latency
    readonly rebuild: Readonly<Record<string, Rebuild & { readonly rate: number }>>
    readonly peakRssMb: Readonly<Record<string, number>>
    /** CPU seconds each processor used over its life (end-to-end and latency phases). */
    readonly cpuSeconds: Readonly<Record<string, number>>
    /** How long the processors ran. */
    readonly wallSeconds: number
  }
  /** The same events on a partitioned stream, with 1 and 2 instances of each processor. */
  readonly scaleOut: {
    readonly partitions: number
    readonly runs: readonly ScaleRun[]
  }
}

/** One end-to-end run of the scale-out phase. */
export interface ScaleRun extends Rate {
  /** Processes of each processor, sharing the partitions. */
  readonly instances: number
  readonly startupSeconds: number
  /** The largest peak RSS among the processes. */
  readonly peakRssMb: number
}

export interface Goal {
  readonly goal: string
  readonly pass: boolean
  /** How far above (PASS) or below (MISS) the goal, e.g. `+12%`. */
  readonly margin: string
}

const num = (n: number): string => Math.round(n).toLocaleString('en-US')
const pct = (n: number): string => `${(n * 100).toFixed(0)}%`
const signed = (n: number): string => `${n >= 0 ? '+' : ''}${(n * 100).toFixed(0)}%`

/** The raw consume + write limit: the slower of (b) and (c). */
function rawLimit(f: Figures): number {
  return Math.min(f.limits.rawConsume.rate, f.limits.rawWrite.rate)
}

/** Met only at the rate asked for: a lower rate than asked says nothing about the goal. */
function latencyGoal(lat: Latency): Goal {
  const reached = lat.rate >= 0.95 * lat.targetRate
  const goal =
    `p99 publish->SQL < 250 ms at ${num(lat.targetRate)} ev/s` +
    (reached ? '' : ` (publisher reached only ${num(lat.rate)} ev/s)`)
  const p99 = lat.missing > 0 ? Number.POSITIVE_INFINITY : lat.p99Ms
  return { goal, pass: reached && p99 < 250, margin: signed(1 - p99 / 250) }
}

/** The goal is for a 1M-event backlog: a smaller one says nothing about it. */
const RSS_GOAL_BACKLOG = 1_000_000

function rssGoal(f: Figures): Goal {
  const maxRss = Math.max(...Object.values(f.fleetstream.peakRssMb))
  const reached = f.events >= RSS_GOAL_BACKLOG
  const goal =
    `processor RSS < 250 MB with a ${num(RSS_GOAL_BACKLOG)}-event backlog` +
    (reached ? '' : ` (the backlog was only ${num(f.events)})`)
  return { goal, pass: reached && maxRss < 250, margin: signed(1 - maxRss / 250) }
}

export function goals(f: Figures): Goal[] {
  const fs = f.fleetstream
  const atLeast = (goal: string, value: number, min: number): Goal => ({
    goal,
    pass: value >= min,
    margin: signed(value / min - 1),
  })
  const minRebuild = Math.min(...Object.values(fs.rebuild).map((r) => r.rate))
  return [
    atLeast('ingest >= 65% of core publish', fs.ingest.rate / f.limits.corePublish.rate, 0.65),
    atLeast('end-to-end >= 50% of raw limit', fs.endToEnd.rate / rawLimit(f), 0.5),
    atLeast('end-to-end >= 10x naive', fs.endToEnd.rate / f.naive.rate, 10),
    latencyGoal(fs.latency),
    atLeast('rebuild >= 50k events/s per projection', minRebuild, 50_000),
    rssGoal(f),
  ]
}

export function printReport(f: Figures, json: boolean): void {
  const out = (line = ''): void => {
    process.stdout.write(`${line}\n`)
  }
  if (json) {
    out(JSON.stringify({ ...f, goals: goals(f) }, null, 2))
    return
  }
  const fs = f.fleetstream
  const limit = rawLimit(f)
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
    'ack 1 in 1000',
  )
  rate(
    '',
    '(c) raw Postgres unnest INSERT',
    f.limits.rawWrite,
    undefined,
    undefined,
    '1000 rows/statement, 1 connection',
  )
  rate(
    '',
    "(a') raw js.publish, msgID, 256 in flight",
    f.jsPublish,
    f.jsPublish.rate / f.limits.corePublish.rate,
    undefined,
    'vs (a); not a limit: splits ingest',
  )
  rate('naive', 'consume, INSERT per row, ack each', f.naive, undefined, 1)
  rate(
    'fleetstream',
    'ingest (PublishPipeline, PubAcks)',
    fs.ingest,
    fs.ingest.rate / f.limits.corePublish.rate,
    undefined,
    'vs (a)',
  )
  rate(
    '',
    'end-to-end, 3 processor processes',
    fs.endToEnd,
    fs.endToEnd.rate / limit,
    fs.endToEnd.rate / f.naive.rate,
    `vs min(b,c); incl. ${fs.endToEnd.startupSeconds.toFixed(1)} s start-up ` +
      `(${num(fs.endToEnd.events / (fs.endToEnd.seconds - fs.endToEnd.startupSeconds))}/s after)`,
  )
  for (const [name, r] of Object.entries(fs.rebuild)) {
    rate(
      '',
      `rebuild ${name}`,
      { events: r.applied, seconds: r.seconds, rate: r.rate },
      r.rate / limit,
      r.rate / f.naive.rate,
      'vs min(b,c)',
    )
  }
  const lat = fs.latency
  other(
    '',
    `publish->SQL p50 / p99 / max`,
    `${lat.p50Ms.toFixed(0)} / ${lat.p99Ms.toFixed(0)} / ${lat.maxMs.toFixed(0)} ms`,
    `${num(lat.rate)} of ${num(lat.targetRate)} ev/s, ${num(lat.samples)} probes, ${lat.missing} missing, poll ${lat.pollMs} ms`,
  )
  for (const [name, mb] of Object.entries(fs.peakRssMb)) {
    const cpu = fs.cpuSeconds[name] ?? Number.NaN
    other(
      '',
      `peak RSS ${name}`,
      `${mb.toFixed(0)} MB`,
      `VmHWM; ${cpu.toFixed(1)} CPU s in ${fs.wallSeconds.toFixed(1)} s`,
    )
  }

  const single = f.scaleOut.runs.find((r) => r.instances === 1)
  f.scaleOut.runs.forEach((r, i) => {
    rate(
      i === 0 ? 'scale-out' : '',
      `end-to-end, ${f.scaleOut.partitions} partitions, ${r.instances} instance${r.instances === 1 ? '' : 's'} each`,
      r,
      r.rate / limit,
      r.rate / f.naive.rate,
      `${r.instances * 3} processes; incl. ${r.startupSeconds.toFixed(1)} s start-up; peak RSS ${r.peakRssMb.toFixed(0)} MB` +
        (single !== undefined && r !== single
          ? `; ${(r.rate / single.rate).toFixed(2)}x 1 instance`
          : ''),
    )
  })

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
  out(`payload: ${num(f.events)} reading events, ${f.payloadBytes} bytes of JSON each on average`)
  out()
  out(line(head))
  out(line(widths.map((w) => '-'.repeat(w))))
  for (const r of rows) out(line(r))
  out()
  const gs = goals(f)
  out(
    `goals: ${gs.filter((g) => g.pass).length}/${gs.length} met: ` +
      gs.map((g) => `${g.pass ? 'PASS' : 'MISS'} ${g.goal} (${g.margin})`).join('; '),
  )
}
