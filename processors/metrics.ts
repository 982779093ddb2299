/**
 * The Prometheus metrics of a fleetstream process: each processor's instruments
 * (runner/types.ts, ProcessorMetrics) and the lag figures sampled in the background.
 */
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client'
import type { BreakerState } from '../infra/failures.ts'
import type { MetricsSink, ProcessorStats, RunningProcessor } from './runner/types.ts'

/**
 * Lag figures read from NATS and Postgres in the background. A part that could not be read in
 * time is absent, and the gauges fed by it are left out of the scrapes until a read succeeds
 * rather than repeating stale values.
 */
export interface LagSample {
  readonly nats?: {
    readonly stream: {
      readonly name: string
      readonly messages: number
      readonly bytes: number
      readonly lastSeq: number
      /** Percent of its storage limit (its own or the account's) in use; null without a limit. */
      readonly storageUsePercent: number | null
    }
    /**
     * Per processor (per partition, e.g. `readings-p2`, when FLEET_EVENTS is partitioned): the
     * newest stream sequence its filter matches (0: none yet).
     */
    readonly lastSeq: Readonly<Record<string, number>>
    /** Per processor (or partition): its durable consumer's counts; absent when the consumer does not exist. */
    readonly consumers: Readonly<
      Record<string, { readonly pending: number; readonly ackPending: number } | undefined>
    >
    /** Entries in FLEET_DLQ per processor. */
    readonly dlq: Readonly<Record<string, number>>
  }
  readonly postgres?: {
    /** Per processor (or partition): `last_seq` of its row in processor_checkpoints (0: none yet). */
    readonly checkpoints: Readonly<Record<string, number>>
  }
}

/**
 * The metrics of one fleetstream process, in a registry of its own (Prometheus text format).
 *
 * ```ts
 * const metrics = createMetrics({ sample: () => readLag(rt), refreshEveryMs: 5000 })
 * startProcessor(spec, { ...rt, metrics }) // registers itself
 * const text = await metrics.registry.metrics()
 * ```
 */
export interface Metrics extends MetricsSink {
  readonly registry: Registry
  /** Every processor registered in this process. */
  readonly processors: readonly RunningProcessor[]
  /**
   * Reads the lag figures anew (after the read in progress, if any), e.g. once the sources are
   * open; otherwise they are read every `refreshEveryMs` and when a processor registers.
   */
  refresh(): Promise<void>
  /** Stops the background reads. */
  close(): void
}

export interface MetricsOptions {
  /** Reads lag figures; never called by a scrape, one call at a time; must bound its own time. */
  readonly sample: () => Promise<LagSample>
  /**
   * How often the lag figures are read in the background. Scrapes are served from memory, so
   * what NATS and Postgres see is one read per interval however many scrapers there are.
   */
  readonly refreshEveryMs: number
  /** Node.js and process metrics (RSS, CPU, event loop lag, GC, handles); default true. */
  readonly defaultMetrics?: boolean
}

/** Metric names, as the README lists them. */
export const METRIC = {
  processed: 'fleetstream_events_processed_total',
  failed: 'fleetstream_events_failed_total',
  skipped: 'fleetstream_redeliveries_skipped_total',
  retries: 'fleetstream_transaction_retries_total',
  rewinds: 'fleetstream_checkpoint_rewinds_total',
  batchSize: 'fleetstream_batch_size_events',
  batchDuration: 'fleetstream_batch_duration_seconds',
  latency: 'fleetstream_end_to_end_latency_seconds',
  state: 'fleetstream_processor_state',
  circuit: 'fleetstream_postgres_circuit_state',
  pending: 'fleetstream_consumer_pending_messages',
  ackPending: 'fleetstream_consumer_ack_pending_messages',
  checkpoint: 'fleetstream_checkpoint_sequence',
  checkpointLag: 'fleetstream_checkpoint_lag_sequences',
  dlqDepth: 'fleetstream_dlq_depth',
  streamMessages: 'fleetstream_stream_messages',
  streamBytes: 'fleetstream_stream_bytes',
  streamStorageUse: 'fleetstream_stream_storage_use_ratio',
  streamLastSeq: 'fleetstream_stream_last_sequence',
  sourceUp: 'fleetstream_lag_source_up',
  refreshes: 'fleetstream_lag_refreshes_total',
  sampleAge: 'fleetstream_lag_age_seconds',
} as const

const STATES: readonly ProcessorStats['state'][] = [
  'starting',
  'standby',
  'running',
  'backing-off',
  'stopped',
]

/** 0 closed, 1 half-open, 2 open. */
export const CIRCUIT_STATE_VALUE: Readonly<Record<BreakerState, number>> = {
  closed: 0,
  'half-open': 1,
  open: 2,
}

export function createMetrics(opts: MetricsOptions): Metrics {
  const registry = new Registry()
  if (opts.defaultMetrics ?? true) collectDefaultMetrics({ register: registry })
  const tracked: RunningProcessor[] = []
  const names = () => tracked.map((p) => p.name)
  const registers = [registry]

  const processed = new Counter({
    name: METRIC.processed,
    help: 'Events committed to the read model with the checkpoint (idempotent re-applies included).',
    labelNames: ['processor'],
    registers,
  })
  const failed = new Counter({
    name: METRIC.failed,
    help: 'Events refused and parked in FLEET_DLQ, by reason.',
    labelNames: ['processor', 'reason'],
    registers,
  })
  const skipped = new Counter({
    name: METRIC.skipped,
    help: 'Redeliveries at or below the checkpoint, and redrives meant for another processor, acked without work.',
    labelNames: ['processor'],
    registers,
  })
  const retries = new Counter({
    name: METRIC.retries,
    help: 'Transactions that failed transiently and were tried again.',
    labelNames: ['processor'],
    registers,
  })
  const rewinds = new Counter({
    name: METRIC.rewinds,
    help: 'Times the stream no longer held what a processor had applied (a NATS failover) and its checkpoint went back to read again.',
    labelNames: ['processor'],
    registers,
  })
  const batchSize = new Histogram({
    name: METRIC.batchSize,
    help: 'Messages per committed batch (redeliveries included).',
    labelNames: ['processor'],
    buckets: [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000],
    registers,
  })
  const batchDuration = new Histogram({
    name: METRIC.batchDuration,
    help: 'Time from taking a batch off the consumer to its commit and ack.',
    labelNames: ['processor'],
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    registers,
  })
  const latency = new Histogram({
    name: METRIC.latency,
    help: "From the time FLEET_EVENTS stored an event (the stream's timestamp) to its commit in Postgres.",
    labelNames: ['processor'],
    buckets: [
      0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21_600,
    ],
    registers,
  })

  new Gauge({
    name: METRIC.state,
    help: 'The processor state: 1 for the current one (starting, standby, running, backing-off, stopped).',
    labelNames: ['processor', 'state'],
    registers,
    collect() {
      this.reset()
      for (const p of tracked) {
        for (const s of STATES)
          this.set({ processor: p.name, state: s }, p.stats.state === s ? 1 : 0)
      }
    },
  })
  new Gauge({
    name: METRIC.circuit,
    help: 'Circuit breaker on Postgres: 0 closed, 1 half-open (probing), 2 open (not fetching).',
    labelNames: ['processor'],
    registers,
    collect() {
      this.reset()
      for (const p of tracked)
        this.set({ processor: p.name }, CIRCUIT_STATE_VALUE[p.stats.postgres])
    },
  })

  // The lag figures are read in the background and kept here; a scrape only reads memory, so a
  // flood of scrapes costs NATS and Postgres nothing.
  const refreshes = new Counter({
    name: METRIC.refreshes,
    help: 'Reads of the lag figures from NATS and Postgres (in the background, never by a scrape).',
    registers,
  })
  let last: { at: number; sample: LagSample } | undefined
  let inflight: Promise<void> | undefined
  let queued: Promise<void> | undefined
  let closed = false
  const readOnce = async (): Promise<void> => {
    refreshes.inc()
    const s = await opts.sample().catch((): LagSample => ({}))
    last = { at: Date.now(), sample: s }
  }
  // A read that starts no earlier than the call: at most one runs and one waits behind it.
  const refresh = (): Promise<void> => {
    if (closed) return Promise.resolve()
    queued ??= (inflight ?? Promise.resolve()).then(() => {
      queued = undefined
      inflight = readOnce().finally(() => {
        inflight = undefined
      })
      return inflight
    })
    return queued
  }
  const timer = setInterval(() => void refresh(), opts.refreshEveryMs)
  // The figures are no reason to keep a process alive.
  timer.unref()
  new Gauge({
    name: METRIC.sampleAge,
    help: 'Seconds since the lag figures served were read (absent before the first read).',
    registers,
    collect() {
      this.reset()
      if (last !== undefined) this.set((Date.now() - last.at) / 1000)
    },
  })
  const sampled = (
    name: string,
    help: string,
    labelNames: readonly string[],
    fill: (g: Gauge, s: LagSample, processors: readonly string[]) => void,
  ) =>
    new Gauge({
      name,
      help,
      labelNames,
      registers,
      collect() {
        this.reset()
        fill(this, last?.sample ?? {}, names())
      },
    })

  sampled(
    METRIC.pending,
    "Messages the processor's durable consumer has not delivered yet (JetStream num_pending).",
    ['processor'],
    (g, s) => {
      for (const [p, c] of Object.entries(s.nats?.consumers ?? {}))
        if (c !== undefined) g.set({ processor: p }, c.pending)
    },
  )
  sampled(
    METRIC.ackPending,
    'Messages delivered to the processor and not acked yet (JetStream num_ack_pending).',
    ['processor'],
    (g, s) => {
      for (const [p, c] of Object.entries(s.nats?.consumers ?? {}))
        if (c !== undefined) g.set({ processor: p }, c.ackPending)
    },
  )
  sampled(
    METRIC.checkpoint,
    "FLEET_EVENTS sequence of the processor's checkpoint in Postgres.",
    ['processor'],
    (g, s) => {
      for (const [p, c] of Object.entries(s.postgres?.checkpoints ?? {})) g.set({ processor: p }, c)
    },
  )
  sampled(
    METRIC.checkpointLag,
    "Newest FLEET_EVENTS sequence the processor's filter matches, minus its checkpoint in Postgres.",
    ['processor'],
    (g, s) => {
      for (const [p, c] of Object.entries(s.postgres?.checkpoints ?? {})) {
        const last = s.nats?.lastSeq[p]
        if (last !== undefined) g.set({ processor: p }, Math.max(0, last - c))
      }
    },
  )
  sampled(
    METRIC.dlqDepth,
    'Events this processor parked in FLEET_DLQ and not redriven yet.',
    ['processor'],
    (g, s, ps) => {
      if (s.nats === undefined) return
      for (const p of ps) g.set({ processor: p }, s.nats.dlq[p] ?? 0)
    },
  )
  const streamGauge = (name: string, help: string, pick: (n: NatsPart) => number) =>
    sampled(name, help, ['stream'], (g, s) => {
      if (s.nats !== undefined) g.set({ stream: s.nats.stream.name }, pick(s.nats))
    })
  streamGauge(METRIC.streamMessages, 'Messages stored in FLEET_EVENTS.', (n) => n.stream.messages)
  streamGauge(METRIC.streamBytes, 'Bytes stored in FLEET_EVENTS.', (n) => n.stream.bytes)
  streamGauge(METRIC.streamLastSeq, 'Last sequence of FLEET_EVENTS.', (n) => n.stream.lastSeq)
  sampled(
    METRIC.streamStorageUse,
    "Share of FLEET_EVENTS's storage limit in use (its own or the account's; absent without one). At 1 every device's event is refused, and MQTT devices on nats-server 2.9 still get a PUBACK.",
    ['stream'],
    (g, s) => {
      const use = s.nats?.stream.storageUsePercent
      if (s.nats !== undefined && use != null) g.set({ stream: s.nats.stream.name }, use / 100)
    },
  )
  sampled(
    METRIC.sourceUp,
    'Whether the last read of the lag figures from NATS and Postgres succeeded (1) or not in time (0: those gauges are left out).',
    ['source'],
    (g, s) => {
      g.set({ source: 'nats' }, s.nats === undefined ? 0 : 1)
      g.set({ source: 'postgres' }, s.postgres === undefined ? 0 : 1)
    },
  )

  return {
    registry,
    processors: tracked,
    refresh,
    close() {
      closed = true
      clearInterval(timer)
    },
    register(p) {
      if (!tracked.includes(p)) {
        tracked.push(p)
        // Its figures from now on, not at the next interval.
        void refresh()
      }
      const name = p.name
      const labels = { processor: name }
      const processedFor = processed.labels(labels)
      const skippedFor = skipped.labels(labels)
      const retriesFor = retries.labels(labels)
      const rewindsFor = rewinds.labels(labels)
      const sizeFor = batchSize.labels(labels)
      const durationFor = batchDuration.labels(labels)
      const latencyFor = latency.labels(labels)
      // Series start at zero, so a rate over them exists before the first event.
      for (const c of [processedFor, skippedFor, retriesFor, rewindsFor]) c.inc(0)
      for (const h of [batchSize, batchDuration, latency]) h.zero(labels)
      return {
        batch(size, seconds) {
          sizeFor.observe(size)
          durationFor.observe(seconds)
        },
        committed(events) {
          if (events.length === 0) return
          processedFor.inc(events.length)
          const now = Date.now()
          // The processor's clock against the NATS server's: never below zero when they disagree.
          for (const e of events)
            latencyFor.observe(Math.max(0, now - e.ingestedAt.getTime()) / 1000)
        },
        parked(reason) {
          failed.inc({ processor: name, reason })
        },
        skipped() {
          skippedFor.inc()
        },
        retried() {
          retriesFor.inc()
        },
        rewound() {
          rewindsFor.inc()
        },
      }
    },
  }
}

type NatsPart = NonNullable<LagSample['nats']>
