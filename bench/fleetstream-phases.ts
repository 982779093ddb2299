/**
 * The bench's phases that measure fleetstream itself (limits.ts measures the raw limits they are
 * compared with): ingest through the publisher, the processors end to end on the backlog, publish
 * to SQL latency at a steady rate, and `fleetstream rebuild`.
 */
import { setTimeout as sleep } from 'node:timers/promises'
import type pg from 'pg'
import { v7 as uuidv7 } from 'uuid'
import type { Runtime } from '../app/runtime.ts'
import { PublishPipeline, type Publisher } from '../infra/publisher.ts'
import { PROCESSOR_NAMES, type ProcessorName } from '../processors/processor-registry.ts'
import { slotsOf } from '../processors/partitions.ts'
import { readCheckpointSeqs } from '../processors/progress/checkpoints.ts'
import {
  type BenchEvent,
  BenchError,
  type Child,
  cpuSeconds,
  note,
  peakRssMb,
  percentile,
  spawnCli,
  readingDraft,
  waitUntil,
} from './common.ts'

/** Publishes in flight, as the simulator's default. */
export const WINDOW = 1024

/** Ingest through fleetstream's publisher: dedup ids, every PubAck checked, `WINDOW` in flight. */
export async function ingest(
  publisher: Publisher,
  events: readonly BenchEvent[],
): Promise<{ seconds: number; stored: number }> {
  let stored = 0
  const pipe = new PublishPipeline(WINDOW, (r) => {
    if (!r.duplicate) stored++
  })
  const start = performance.now()
  for (const e of events) await pipe.submit(() => publisher.publishEvent(e.event))
  await pipe.drain()
  return { seconds: (performance.now() - start) / 1000, stored }
}

async function checkpoints(rt: Runtime): Promise<Map<string, number>> {
  const slots = PROCESSOR_NAMES.flatMap((n) => slotsOf(rt.processors[n], rt.config))
  return readCheckpointSeqs(
    rt.db,
    slots.map((s) => s.key),
  )
}

/** The newest stream sequence each slot's filter matches: where its checkpoint must get to. */
async function targets(rt: Runtime): Promise<Map<string, number>> {
  const out = new Map<string, number>()
  for (const name of PROCESSOR_NAMES) {
    for (const slot of slotsOf(rt.processors[name], rt.config)) {
      const m = await rt.jsm.streams
        .getMessage(rt.config.streams.events, { last_by_subj: slot.filterSubject })
        .catch(() => null)
      out.set(slot.key, m?.seq ?? 0)
    }
  }
  return out
}

export interface Processors {
  readonly children: readonly Child[]
  readonly seconds: number
  /**
   * Per processor: seconds from spawning until its first checkpoint moved (process start-up,
   * connecting, its first applied batch); with several slots, the first of its slots. The
   * processors start at once, on the same cores.
   */
  readonly startupSeconds: Readonly<Record<string, number>>
  /** Per processor: seconds from spawning until every checkpoint of it reached its target. */
  readonly caughtUpSeconds: Readonly<Record<string, number>>
  /** CPU seconds each process had used when all were caught up (they start with the phase). */
  readonly cpuSeconds: Readonly<Record<string, number>>
}

/**
 * Starts `instances` processes of each processor on the backlog (each its own process) and
 * waits until every checkpoint (every partition's, on a partitioned stream) reaches the newest
 * event its filter matches.
 */
export async function endToEnd(
  rt: Runtime,
  env: Record<string, string>,
  timeoutMs: number,
  instances = 1,
): Promise<Processors> {
  const want = await targets(rt)
  // Where each checkpoint stood at spawning: a processor has started once its own moved on.
  const initial = await checkpoints(rt)
  const owner = new Map<string, string>()
  for (const name of PROCESSOR_NAMES) {
    for (const slot of slotsOf(rt.processors[name], rt.config)) owner.set(slot.key, name)
  }
  const start = performance.now()
  const children = PROCESSOR_NAMES.flatMap((name) =>
    Array.from({ length: instances }, (_, i) =>
      spawnCli(instances === 1 ? name : `${name}#${i + 1}`, ['run', name, '--no-clock'], {
        ...env,
      }),
    ),
  )
  const startup: Record<string, number> = {}
  const caughtUp: Record<string, number> = {}
  let seen = new Map<string, number>()
  const behind = () => [...want].filter(([k, seq]) => (seen.get(k) ?? 0) < seq)
  await waitUntil(
    'every checkpoint to reach the newest event its processor reads',
    async () => {
      const dead = children.find((c) => !c.running())
      if (dead !== undefined) {
        throw new BenchError(`processor ${dead.name} exited early:\n${dead.output()}`)
      }
      seen = await checkpoints(rt)
      const now = (performance.now() - start) / 1000
      for (const [key, seq] of seen) {
        const name = owner.get(key)
        if (name !== undefined && seq > (initial.get(key) ?? 0) && startup[name] === undefined)
          startup[name] = now
      }
      const late = new Set(behind().map(([k]) => owner.get(k)))
      for (const name of PROCESSOR_NAMES) {
        if (!late.has(name) && caughtUp[name] === undefined) caughtUp[name] = now
      }
      return late.size === 0
    },
    timeoutMs,
    20,
  ).catch((err: unknown) => {
    if (err instanceof BenchError) {
      const at = behind()
        .map(([k, seq]) => `${k} at ${seen.get(k) ?? 0} of ${seq}`)
        .join(', ')
      throw new BenchError(`${err.message} (${at})`, { cause: err })
    }
    throw err
  })
  const seconds = (performance.now() - start) / 1000
  const cpu = Object.fromEntries(children.map((c) => [c.name, cpuSeconds(c.pid)]))
  return {
    children,
    seconds,
    startupSeconds: startup,
    caughtUpSeconds: caughtUp,
    cpuSeconds: cpu,
  }
}

export interface StartupAlone {
  /** Per processor: seconds from spawning until its first checkpoint moved. */
  readonly seconds: Readonly<Record<string, number>>
  /** Per processor: the events it had applied when it stopped (a head start for the next phase). */
  readonly applied: Readonly<Record<string, number>>
}

/**
 * Start-up of each processor on its own: spawned alone on the backlog (nothing else starting
 * beside it), timed until its first applied batch, then stopped. The end-to-end phase starts all
 * three at once on the 2 cores, so its start-up figures also hold the other two's start-up.
 */
export async function startupAlone(
  rt: Runtime,
  env: Record<string, string>,
  timeoutMs: number,
): Promise<StartupAlone> {
  const seconds: Record<string, number> = {}
  const applied: Record<string, number> = {}
  for (const name of PROCESSOR_NAMES) {
    const own = async (): Promise<number> => {
      const seen = await checkpoints(rt)
      const keys = slotsOf(rt.processors[name], rt.config).map((s) => s.key)
      return keys.reduce((n, k) => n + (seen.get(k) ?? 0), 0)
    }
    const before = await own()
    const start = performance.now()
    const child = spawnCli(name, ['run', name, '--no-clock'], env)
    try {
      await waitUntil(
        `processor ${name} (started alone) to apply its first batch`,
        async () => {
          if (!child.running()) {
            throw new BenchError(`processor ${name} exited early:\n${child.output()}`)
          }
          return (await own()) > before
        },
        timeoutMs,
        10,
      )
      seconds[name] = (performance.now() - start) / 1000
    } finally {
      await child.stop()
    }
    applied[name] = (await own()) - before
  }
  return { seconds, applied }
}

export interface Latency {
  /** The rate asked for. */
  readonly targetRate: number
  /** The rate the publisher reached (it shares the cores with the processors). */
  readonly rate: number
  readonly published: number
  readonly samples: number
  readonly missing: number
  readonly p50Ms: number
  readonly p99Ms: number
  readonly maxMs: number
  readonly pollMs: number
  /** Seconds published at the rate before the probes (see {@link latency}); absent in older runs. */
  readonly warmupSeconds?: number
}

/**
 * Publish -> visible in SQL at a steady `rate`: every `sampleEvery`-th event is a probe whose
 * submit time we keep; a poller asks `readings` by primary key for the probes not seen yet,
 * every `pollMs`. A probe's latency ends when the query that first returns it has returned, so
 * it includes up to one poll interval plus one query: an upper bound, never an underestimate.
 * The first `warmupSeconds` publish at the rate without probes: the steady state is measured,
 * not the way into it from what ran before (the processors' heaps after a backlog are collected
 * in the first seconds of a lighter load).
 */
export async function latency(
  pool: pg.Pool,
  publisher: Publisher,
  opts: {
    rate: number
    devices: number
    seconds: number
    warmupSeconds: number
    firstIndex: number
  },
): Promise<Latency> {
  const sampleEvery = 10
  const pollMs = 10
  const pending = new Map<string, number>()
  const latencies: number[] = []
  const state = { publishing: true }
  const poller = (async () => {
    while (state.publishing || pending.size > 0) {
      if (pending.size > 0) {
        const ids = [...pending.keys()]
        const { rows } = await pool.query<{ event_id: string }>(
          'select event_id from readings where event_id = any($1::text[])',
          [ids],
        )
        const now = performance.now()
        for (const r of rows) {
          const t0 = pending.get(r.event_id)
          if (t0 === undefined) continue
          latencies.push(now - t0)
          pending.delete(r.event_id)
        }
      }
      await sleep(pollMs)
    }
  })()
  const pipe = new PublishPipeline(WINDOW)
  const nextId = eventIds()
  const warm = Math.round(opts.rate * opts.warmupSeconds)
  const total = warm + Math.round(opts.rate * opts.seconds)
  const tickMs = 10
  const start = performance.now()
  let sent = 0
  try {
    while (sent < total) {
      // Catch up to the schedule: a late tick sends what the schedule says is due by now.
      const due = Math.min(total, Math.floor(((performance.now() - start) / 1000) * opts.rate))
      for (; sent < due; sent++) {
        // publish() stamps and validates once, as a device gateway would call it.
        const draft = { ...readingDraft(opts.firstIndex + sent, opts.devices), eventId: nextId() }
        if (sent >= warm && sent % sampleEvery === 0) pending.set(draft.eventId, performance.now())
        await pipe.submit(() => publisher.publish(draft))
      }
      await sleep(tickMs)
    }
    await pipe.drain()
    const publishSeconds = (performance.now() - start) / 1000
    const drainUntil = Date.now() + 60_000
    while (pending.size > 0 && Date.now() < drainUntil) await sleep(50)
    const missing = pending.size
    state.publishing = false
    pending.clear()
    await poller
    latencies.sort((a, b) => a - b)
    return {
      targetRate: opts.rate,
      rate: sent / publishSeconds,
      published: sent,
      samples: latencies.length,
      missing,
      p50Ms: percentile(latencies, 50),
      p99Ms: percentile(latencies, 99),
      maxMs: latencies.at(-1) ?? Number.NaN,
      pollMs,
      warmupSeconds: opts.warmupSeconds,
    }
  } finally {
    state.publishing = false
    pending.clear()
    await poller.catch(() => undefined)
  }
}

/**
 * Unique event ids for the latency phase's publisher, as a device fleet's would be (unique, not
 * random): one uuidv7 per phase, its last 12 hex digits a counter. A `uuidv7()` per event costs
 * a crypto call each (9-15% of the publisher's CPU), on the cores the processors need.
 */
function eventIds(): () => string {
  const base = uuidv7().slice(0, 24) // 'xxxxxxxx-xxxx-7xxx-yxxx-'
  let n = 0
  return () => base + (n++).toString(16).padStart(12, '0')
}

/** Peak RSS (MB) and CPU seconds of each processor, then stops them. */
export async function stopProcessors(children: readonly Child[]): Promise<{
  rssMb: Record<string, number>
  cpuSeconds: Record<string, number>
}> {
  const rssMb: Record<string, number> = {}
  const cpu: Record<string, number> = {}
  for (const c of children) {
    rssMb[c.name] = peakRssMb(c.pid)
    cpu[c.name] = cpuSeconds(c.pid)
  }
  await Promise.all(children.map((c) => c.stop()))
  return { rssMb, cpuSeconds: cpu }
}

export interface Rebuild {
  readonly applied: number
  readonly seconds: number
  readonly wallSeconds: number
}

/** `fleetstream rebuild <name> --drop-retired --json` as its own process; its own figures. */
export async function rebuild(
  name: ProcessorName,
  env: Record<string, string>,
  timeoutMs: number,
): Promise<Rebuild> {
  const start = performance.now()
  const child = spawnCli(`rebuild ${name}`, ['rebuild', name, '--drop-retired', '--json'], env)
  const timer = setTimeout(() => void child.stop(1000), timeoutMs)
  const code = await child.exited
  clearTimeout(timer)
  const wallSeconds = (performance.now() - start) / 1000
  const line = child
    .stdout()
    .trim()
    .split('\n')
    .reverse()
    .find((l) => l.startsWith('{'))
  if (code !== 0 || line === undefined) {
    throw new BenchError(`rebuild ${name} exited with ${code}:\n${child.output()}`)
  }
  const r = JSON.parse(line) as { applied?: unknown; elapsedMs?: unknown }
  if (typeof r.applied !== 'number' || typeof r.elapsedMs !== 'number') {
    throw new BenchError(`rebuild ${name} printed no applied/elapsedMs: ${line}`)
  }
  note(`rebuild ${name}: ${r.applied} events in ${(r.elapsedMs / 1000).toFixed(1)} s`)
  return { applied: r.applied, seconds: r.elapsedMs / 1000, wallSeconds }
}
