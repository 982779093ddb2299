import { connect as connectSocket, createServer } from 'node:net'
import { spawn, type ChildProcess } from 'node:child_process'
import { mkdtemp, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { jetstreamManager } from '@nats-io/jetstream'
import { connect, type NatsConnection } from '@nats-io/transport-node'
import { loadConfig, type Config } from '../infra/config.ts'
import { createLogger } from '../infra/logger.ts'
import { createPublisher, type Publisher } from '../infra/publisher.ts'
import { encodeHlc, HybridLogicalClock } from '../schemas/hlc.ts'
import type { FleetEvent } from '../schemas/events.ts'
import { openRuntime, setUp, type Runtime } from '../app/runtime.ts'
import { consumerInfo } from '../processors/runner/consumer.ts'
import { PROCESSOR_NAMES, type ProcessorName } from '../processors/processor-registry.ts'
import { startProcessor } from '../processors/runner/runner.ts'
import { type ProcessorSpec, type RunningProcessor } from '../processors/runner/types.ts'
import { readingsProcessor } from '../processors/readings-processor.ts'
import { freshDatabase, startNatsServer, type NatsServer } from './harness/test-servers.ts'
import type { EventDraft } from '../infra/publisher.ts'

export const repoRoot = fileURLToPath(new URL('..', import.meta.url))
export const cliPath = fileURLToPath(new URL('../dist/cli/fleetstream.js', import.meta.url))

/** Environment for a fleetstream process pointed at throwaway servers. */
export function testEnv(
  natsUrl: string,
  databaseUrl: string,
  extra: Record<string, string> = {},
): Record<string, string> {
  return {
    NATS_URL: natsUrl,
    DATABASE_URL: databaseUrl,
    LOG_LEVEL: 'warn',
    PROCESSOR_BATCH_LINGER_MS: '5',
    // Processes of a run (and of test files running side by side) must not share a port.
    METRICS_PORT: '0',
    METRICS_HOST: '127.0.0.1',
    ...extra,
  }
}

export function testConfig(
  natsUrl: string,
  databaseUrl: string,
  extra: Record<string, string> = {},
): Config {
  return loadConfig(
    testEnv(natsUrl, databaseUrl, { LOG_LEVEL: process.env.TEST_LOG_LEVEL ?? 'silent', ...extra }),
  )
}

/** Connections plus schema, streams and consumers, as `fleetstream setup` leaves them. */
export async function testRuntime(config: Config): Promise<Runtime> {
  const rt = await openRuntime(config, createLogger({ level: config.logLevel, name: 'test' }), {
    name: 'fleetstream-test',
  })
  await setUp(rt)
  return rt
}

export function testPublisher(rt: Runtime, node = 'test-gw'): Publisher {
  return createPublisher(rt.js, { clock: new HybridLogicalClock({ node, maxOffsetMs: 500 }) })
}

export function readingDraft(
  deviceId: string,
  value: number,
  metric = 'temperature',
): EventDraft<'reading.recorded'> {
  return { type: 'reading.recorded', deviceId, data: { metric, value, unit: 'C' } }
}

/** Polls until `check` returns true, or fails naming what it waited for and the last value. */
export async function waitFor(
  what: string,
  check: () => Promise<boolean> | boolean,
  timeoutMs = 30_000,
  describe?: () => Promise<string> | string,
): Promise<void> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    if (await check()) return
    if (Date.now() > deadline) {
      throw new Error(
        `timed out after ${timeoutMs} ms waiting for ${what}${describe ? `: ${await describe()}` : ''}`,
      )
    }
    await new Promise((r) => setTimeout(r, 100))
  }
}

/** A running `fleetstream` CLI process with its output collected. */
export interface CliProcess {
  readonly child: ChildProcess
  readonly output: () => string
  /** Resolves with the exit code (or 128 + signal number when killed). */
  readonly exited: Promise<number>
}

export function spawnCli(args: readonly string[], env: Record<string, string>): CliProcess {
  const child = spawn(process.execPath, [cliPath, ...args], {
    cwd: repoRoot,
    env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '/tmp', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  let out = ''
  child.stdout.on('data', (d: Buffer) => (out += d.toString()))
  child.stderr.on('data', (d: Buffer) => (out += d.toString()))
  const exited = new Promise<number>((resolve) => {
    child.on('exit', (code, signal) => {
      resolve(code ?? 128 + (signal === 'SIGKILL' ? 9 : signal === 'SIGTERM' ? 15 : 2))
    })
  })
  return { child, output: () => out, exited }
}

/** Runs the CLI to completion. */
export async function runCli(
  args: readonly string[],
  env: Record<string, string>,
  timeoutMs = 60_000,
): Promise<{ code: number; output: string }> {
  const p = spawnCli(args, env)
  const timer = setTimeout(() => p.child.kill('SIGKILL'), timeoutMs)
  const code = await p.exited
  clearTimeout(timer)
  return { code, output: p.output() }
}

/** A bare NATS connection and JetStream manager, for tests that act as the `nats` CLI would. */
export async function natsAdmin(
  url: string,
): Promise<{ nc: NatsConnection; jsm: Awaited<ReturnType<typeof jetstreamManager>> }> {
  const nc = await connect({ servers: url })
  return { nc, jsm: await jetstreamManager(nc) }
}

/** Every processor's consumer has nothing pending or unacked (acks follow commits). */
export async function allCaughtUp(
  rt: Runtime,
  names: readonly string[],
  timeoutMs = 60_000,
): Promise<void> {
  // A consumer being re-anchored (deleted and created again) is absent for a moment: not done.
  const infos = () =>
    Promise.all(names.map((n) => consumerInfo(rt.jsm, rt.config.streams.events, n)))
  let calm = 0
  await waitFor(
    `processors ${names.join(', ')} to catch up`,
    async () => {
      const done = (await infos()).every(
        (i) => i !== undefined && i.num_pending === 0 && i.num_ack_pending === 0,
      )
      calm = done ? calm + 1 : 0
      return calm >= 2
    },
    timeoutMs,
    async () =>
      (await infos())
        .map((i, k) =>
          i === undefined
            ? `${names[k]}: no consumer`
            : `${i.name}: pending ${i.num_pending}, ack pending ${i.num_ack_pending}`,
        )
        .join('; '),
  )
}

/**
 * Settings for tests that move stream time ahead with clock ticks (a sensor silent after 30 s
 * without waiting 30 s): a tick may be only HLC_MAX_OFFSET_MS ahead of the stream's clock, so
 * these allow two minutes. Give the same to every process that decides their events (a rebuild
 * must decide as the live run did).
 */
export const FAST_FORWARD_TICKS = { HLC_MAX_OFFSET_MS: '120000' } as const

/** A clock tick at `atMs`, as the clock service publishes it. */
export function tickDraft(atMs: number): EventDraft<'clock.ticked'> {
  const at = new Date(atMs).toISOString()
  return {
    type: 'clock.ticked',
    deviceId: '_system',
    eventId: `tick-${atMs}`,
    occurredAt: at,
    data: { at, intervalSeconds: 10 },
  }
}

/** Each processor's tables, with the columns that legitimately differ between runs left out. */
export const READ_MODEL_TABLES = {
  readings: { readings: [], latest_readings: [], readings_per_minute: [] },
  'sensor-status': { sensor_status: [], sensor_status_history: [], sensor_status_timeline: [] },
  alerts: {
    alerts: [],
    alert_conditions: [],
    alert_sensors: [],
    alert_sensors_timeline: [],
    // when the relay sent it is wall-clock time
    notification_outbox: ['published_at'],
  },
} as const satisfies Record<ProcessorName, Record<string, readonly string[]>>

export const READ_MODEL_TABLE_NAMES: readonly string[] = Object.values(READ_MODEL_TABLES).flatMap(
  (tables) => Object.keys(tables),
)

/**
 * Every read-model table (and the projections' stream clocks), row by row in a stable order.
 * `omit` leaves out more columns everywhere (e.g. `ingested_at`, the storing server's clock, when
 * comparing the read models of two servers).
 */
export async function dumpReadModels(
  rt: Runtime,
  omit: readonly string[] = [],
): Promise<Record<string, unknown[]>> {
  const out: Record<string, unknown[]> = {}
  for (const tables of Object.values(READ_MODEL_TABLES)) {
    for (const [t, cols] of Object.entries(tables)) {
      out[t] = await dumpTable(rt, t, [...cols, ...omit])
    }
  }
  out.projection_clocks = await dumpTable(rt, 'projection_clocks')
  return out
}

/** Every row of a table in a stable order, for comparing read models row by row. */
export async function dumpTable(
  rt: Runtime,
  table: string,
  omit: readonly string[] = [],
): Promise<unknown[]> {
  const { rows } = await rt.pool.query<Record<string, unknown>>(`select * from ${table}`)
  return rows
    .map((r) => Object.fromEntries(Object.entries(r).filter(([c]) => !omit.includes(c))))
    .sort((a, b) => (JSON.stringify(a) < JSON.stringify(b) ? -1 : 1))
}

/** Rules for these tests: short runs so that a handful of readings exercise them. */
const RULES = `
rules:
  - { id: temperature-high, kind: threshold, metric: temperature, above: 40, clear: 35, consecutive: 2, severity: critical }
  - { id: battery-low, kind: battery-low, below: 15, clear: 20, severity: warning }
  - { id: sensor-silent, kind: silent, severity: warning }
`

/** Writes a rules file for a test and returns its path. */
export async function rulesFile(text = RULES): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'fleetstream-rules-'))
  const path = join(dir, 'rules.yaml')
  await writeFile(path, text)
  return path
}

/**
 * Waits until events published so far are outside a 1 s duplicate window. nats-server forgets
 * msg ids on a timer, so an id can outlive the window a little: wait with margin.
 */
export function pastDedupWindow(): Promise<void> {
  return new Promise((r) => setTimeout(r, 2500))
}

/**
 * A throwaway nats-server and database with the test alert rules: a runtime on them, and the
 * environment a `fleetstream` process started by the test gets for the same.
 */
export async function cliSystem(): Promise<{
  nats: NatsServer
  env: Record<string, string>
  rt: Runtime
}> {
  const nats = await startNatsServer()
  const db = await freshDatabase()
  const settings = { ALERT_RULES_FILE: await rulesFile() }
  return {
    nats,
    env: testEnv(nats.url, db, settings),
    rt: await testRuntime(testConfig(nats.url, db, settings)),
  }
}

/** A throwaway nats-server and database with all three processors, in this process. */
export interface Pipeline {
  nats: NatsServer
  rt: Runtime
  running: RunningProcessor[]
  start(config?: Runtime['config']): void
  stop(): Promise<void>
  close(): Promise<void>
}

/** Starts a {@link Pipeline}; `start()` runs the processors (again, after `stop()`). */
export async function pipeline(env: Record<string, string> = {}): Promise<Pipeline> {
  const nats = await startNatsServer()
  const rt = await testRuntime(
    testConfig(nats.url, await freshDatabase(), {
      ALERT_RULES_FILE: await rulesFile(),
      FLEET_DUPLICATE_WINDOW_SECONDS: '1',
      SENSOR_INACTIVITY_TIMEOUT_SECONDS: '30',
      ...env,
    }),
  )
  const p: Pipeline = {
    nats,
    rt,
    running: [],
    start(config = rt.config) {
      p.running = PROCESSOR_NAMES.map((n) => startProcessor(rt.processors[n], { ...rt, config }))
    },
    async stop() {
      await Promise.all(p.running.map((r) => r.stop()))
      p.running = []
    },
    async close() {
      await p.stop()
      await rt.close()
      await nats.cleanup()
    },
  }
  return p
}

/** The readings processor with a bug: it throws on readings of 666 (a poison event for it). */
export const buggyReadings: ProcessorSpec = {
  ...readingsProcessor,
  projection: {
    ...readingsProcessor.projection,
    async apply(trx, events) {
      if (events.some((e) => e.event.type === 'reading.recorded' && e.event.data.value === 666)) {
        throw new RangeError('666 is not a temperature')
      }
      await readingsProcessor.projection.apply(trx, events)
    },
  },
}

/** Publishes raw header blocks, as a client that skips nats.js's checks could (HPUB). */
export async function publishRaw(
  url: string,
  msgs: readonly { subject: string; header?: string; body?: string }[],
): Promise<void> {
  const { hostname, port } = new URL(url)
  const socket = connectSocket(Number(port), hostname)
  const frames = msgs.map(({ subject, header, body: text = '{}' }) => {
    const body = Buffer.from(text)
    if (header === undefined)
      return Buffer.concat([
        Buffer.from(`PUB ${subject} ${body.length}\r\n`),
        body,
        Buffer.from('\r\n'),
      ])
    const h = Buffer.from(header, 'utf8')
    return Buffer.concat([
      Buffer.from(`HPUB ${subject} ${h.length} ${h.length + body.length}\r\n`),
      h,
      body,
      Buffer.from('\r\n'),
    ])
  })
  await new Promise<void>((resolve, reject) => {
    let seen = ''
    socket.on('error', reject)
    socket.on('data', (d: Buffer) => {
      seen += d.toString()
      if (seen.includes('PONG')) resolve()
      if (seen.includes('-ERR')) reject(new Error(seen))
    })
    socket.write(
      Buffer.concat([
        Buffer.from('CONNECT {"verbose":false,"headers":true,"protocol":1}\r\n'),
        ...frames,
        Buffer.from('PING\r\n'),
      ]),
    )
  })
  socket.destroy()
}

/** A temperature reading of `deviceId`, `atSeconds` after `t0Ms`, as gateway `gw` stamps it. */
export function temperatureReading(
  deviceId: string,
  id: string,
  t0Ms: number,
  atSeconds: number,
  value: number,
): FleetEvent {
  const wallMs = t0Ms + atSeconds * 1000
  return {
    eventId: id,
    deviceId,
    type: 'reading.recorded',
    version: 1,
    occurredAt: new Date(wallMs).toISOString(),
    hlc: encodeHlc({ wallMs, logical: 0, node: 'gw' }),
    correlationId: `c-${id}`,
    data: { metric: 'temperature', value, unit: 'C' },
  }
}

/** A threshold rule the alert tests share: temperature above 40 twice raises, 35 or below clears. */
export const TEMPERATURE_HIGH = {
  id: 'temperature-high',
  kind: 'threshold',
  metric: 'temperature',
  above: 40,
  clear: 35,
  consecutive: 2,
  severity: 'critical',
} as const

/** A port nothing listens on: taken from the OS, then released. */
export async function deadPort(): Promise<number> {
  const server = createServer()
  await new Promise<void>((resolve) => {
    server.listen(0, '127.0.0.1', resolve)
  })
  const address = server.address()
  await new Promise<void>((resolve) => {
    server.close(() => {
      resolve()
    })
  })
  if (address === null || typeof address === 'string') throw new Error('no port')
  return address.port
}
