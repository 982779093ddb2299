import { createServer, connect, type Server, type Socket } from 'node:net'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Runtime } from '../app/runtime.ts'
import { PublishPipeline } from '../infra/publisher.ts'
import { LEASE_TIMEOUT_MS, REBALANCE_MS } from '../processors/progress/locks.ts'
import { freshDatabase, startNatsServer, type NatsServer } from './harness/test-servers.ts'
import {
  readingDraft,
  spawnCli,
  testConfig,
  testEnv,
  testPublisher,
  testRuntime,
  waitFor,
  type CliProcess,
} from './fixtures.ts'

/**
 * The failover bound the README states: the server ends a silent holder's lock session after
 * the lease, the standby looks every 2 s, then re-anchors the consumer (a second or so here). The
 * waits below allow far more (two cores shared with other test files); the time is logged.
 */
const STATED_BOUND_MS = LEASE_TIMEOUT_MS + REBALANCE_MS + 3_000
const GENEROUS_MS = 90_000

const LOST = "lost the Postgres session that holds this instance's slots"
const RUNNING = '"msg":"processor running"'
const STANDING_BY = 'standing by'

/**
 * A TCP proxy between one fleetstream process and Postgres that can stop forwarding, both ways, on
 * every connection through it: a network partition with real sockets. Nothing is dropped, as TCP
 * would retransmit it; what was held is delivered when the partition heals.
 */
class PartitionProxy {
  readonly #server: Server
  readonly #sockets = new Set<Socket>()
  #partitioned = false

  private constructor(server: Server) {
    this.#server = server
  }

  static async start(upstream: { host: string; port: number }): Promise<PartitionProxy> {
    const server = createServer()
    const proxy = new PartitionProxy(server)
    server.on('connection', (client) => {
      proxy.#relay(client, upstream)
    })
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
    return proxy
  }

  get port(): number {
    const a = this.#server.address()
    if (a === null || typeof a === 'string') throw new Error('proxy not listening')
    return a.port
  }

  partition(): void {
    this.#partitioned = true
    for (const s of this.#sockets) s.pause()
  }

  heal(): void {
    this.#partitioned = false
    for (const s of this.#sockets) s.resume()
  }

  async close(): Promise<void> {
    for (const s of this.#sockets) s.destroy()
    await new Promise<void>((resolve) => {
      this.#server.close(() => {
        resolve()
      })
    })
  }

  #relay(client: Socket, upstream: { host: string; port: number }): void {
    const server = connect(upstream.port, upstream.host)
    for (const [from, to] of [
      [client, server],
      [server, client],
    ] as const) {
      this.#sockets.add(from)
      if (this.#partitioned) from.pause()
      from.on('data', (d) => to.write(d))
      from.on('end', () => to.end())
      from.on('error', () => to.destroy())
      from.on('close', () => {
        this.#sockets.delete(from)
        to.destroy()
      })
    }
  }
}

interface Fixture {
  nats: NatsServer
  dbUrl: string
  rt: Runtime
  client: pg.Client
  processes: CliProcess[]
  published: number
}

function instanceEnv(f: Fixture, databaseUrl = f.dbUrl): Record<string, string> {
  return testEnv(f.nats.url, databaseUrl, {
    LOG_LEVEL: 'info',
    PROCESSOR_BATCH_SIZE: '50',
    PROCESSOR_BATCH_LINGER_MS: '2',
  })
}

function startInstance(f: Fixture, databaseUrl?: string): CliProcess {
  const p = spawnCli(['run', 'readings', '--no-clock'], instanceEnv(f, databaseUrl))
  f.processes.push(p)
  return p
}

/** How often `needle` appears in the process's output after `from` characters. */
function seen(p: CliProcess, needle: string, from = 0): number {
  return p.output().slice(from).split(needle).length - 1
}

async function publishReadings(f: Fixture, n: number): Promise<void> {
  const publisher = testPublisher(f.rt)
  const pipe = new PublishPipeline(128)
  for (let i = 0; i < n; i++) {
    await pipe.submit(() => publisher.publish(readingDraft(`sensor-${i % 40}`, i)))
  }
  await pipe.drain()
  f.published += n
}

/** What the read model holds, as an operator would read it. */
async function readModel(f: Fixture) {
  const r = await f.client.query<{
    rows: number
    distinct: number
    rolled: number
    doubled: number
    checkpoint: number
  }>(
    `select (select count(*) from readings)::int as rows,
            (select count(distinct event_id) from readings)::int as distinct,
            (select coalesce(sum(count), 0) from readings_per_minute)::int as rolled,
            (select count(*) from (select event_id from readings group by event_id
                                    having count(*) > 1) d)::int as doubled,
            coalesce((select last_seq from processor_checkpoints
                       where processor = 'readings'), 0)::int as checkpoint`,
  )
  return r.rows[0]!
}

async function allApplied(f: Fixture, who: CliProcess[]): Promise<void> {
  await waitFor(
    `all ${f.published} readings applied`,
    async () => (await readModel(f)).rows === f.published,
    GENEROUS_MS,
    async () =>
      `${JSON.stringify(await readModel(f))}\n${who.map((p) => p.output().slice(-3000)).join('\n---\n')}`,
  )
}

/** Every reading is in the read model exactly once, and counted once in the rollup. */
async function expectExactlyOnce(f: Fixture): Promise<void> {
  const m = await readModel(f)
  expect(m).toEqual({
    rows: f.published,
    distinct: f.published,
    rolled: f.published,
    doubled: 0,
    checkpoint: f.published,
  })
}

/** Waits for `what` in `p`'s output after `from`; returns how long it took since `since`. */
async function timeUntil(
  p: CliProcess,
  what: string,
  from: number,
  since: number,
  label: string,
): Promise<number> {
  await waitFor(
    label,
    () => seen(p, what, from) > 0,
    GENEROUS_MS,
    () => p.output().slice(-4000),
  )
  return Date.now() - since
}

function useFixture(): Fixture {
  const f = { processes: [], published: 0 } as unknown as Fixture
  beforeAll(async () => {
    f.nats = await startNatsServer()
    f.dbUrl = await freshDatabase()
    f.rt = await testRuntime(testConfig(f.nats.url, f.dbUrl))
    f.client = new pg.Client(f.dbUrl)
    await f.client.connect()
  })
  afterAll(async () => {
    // SIGKILL ends a stopped process too.
    for (const p of f.processes) p.child.kill('SIGKILL')
    await Promise.all(f.processes.map((p) => p.exited))
    await f.client.end()
    await f.rt.close()
    await f.nats.cleanup()
  })
  return f
}

/** Starts `active` (which takes the slot) and then a standby beside it. */
async function activeAndStandby(f: Fixture, active: CliProcess): Promise<CliProcess> {
  await waitFor(
    'the first instance to take the slot',
    () => seen(active, RUNNING) > 0,
    60_000,
    () => active.output(),
  )
  const standby = startInstance(f)
  await waitFor(
    'the second instance to stand by',
    () => seen(standby, STANDING_BY) > 0,
    60_000,
    () => standby.output(),
  )
  return standby
}

describe('failover of a readings instance that stops answering', { timeout: 300_000 }, () => {
  const f = useFixture()

  it('a frozen (SIGSTOP) active instance loses its slot within the bound; woken, it applies nothing twice and stands by', async () => {
    const active = startInstance(f)
    const standby = await activeAndStandby(f, active)

    const first = publishReadings(f, 3000)
    await waitFor(
      'the active instance to be applying',
      async () => (await readModel(f)).rows > 300,
      GENEROUS_MS,
    )
    const mark = { active: active.output().length, standby: standby.output().length }
    active.child.kill('SIGSTOP')
    const frozenAt = Date.now()
    const took = await timeUntil(
      standby,
      RUNNING,
      mark.standby,
      frozenAt,
      'the standby to take over',
    )
    console.log(
      `failover: standby took the slot ${took} ms after SIGSTOP (stated bound ${STATED_BOUND_MS} ms)`,
    )
    // Twice the bound: room for a loaded machine, none for a holder that keeps its slot.
    expect(took).toBeLessThan(2 * STATED_BOUND_MS)

    await first
    await publishReadings(f, 2000)
    // Everything applied while the old holder is still frozen: nothing waits on its transaction.
    await allApplied(f, [standby])
    expect(seen(active, RUNNING, mark.active)).toBe(0)

    active.child.kill('SIGCONT')
    await timeUntil(active, LOST, mark.active, Date.now(), 'the woken instance to give its slot up')
    await waitFor(
      'the woken instance to stand by',
      () => seen(active, STANDING_BY, mark.active) > 0,
      GENEROUS_MS,
      () => active.output().slice(mark.active),
    )
    await publishReadings(f, 500)
    await allApplied(f, [active, standby])
    await expectExactlyOnce(f)
    // It stood by: the slot stayed with the instance that took it over.
    expect(seen(active, RUNNING, mark.active)).toBe(0)
    for (const p of [active, standby]) expect(p.output()).not.toContain('"level":60')
  })
})

describe('failover of a readings instance cut off from Postgres', { timeout: 300_000 }, () => {
  const f = useFixture()
  let proxy: PartitionProxy
  afterAll(async () => {
    await proxy.close()
  })

  it('a partitioned active instance loses its slot within the bound, notices by itself, and applies nothing twice after the partition heals', async () => {
    const url = new URL(f.dbUrl)
    proxy = await PartitionProxy.start({ host: url.hostname, port: Number(url.port) })
    const viaProxy = new URL(f.dbUrl)
    viaProxy.port = String(proxy.port)
    const active = startInstance(f, viaProxy.toString())
    const standby = await activeAndStandby(f, active)

    const first = publishReadings(f, 3000)
    await waitFor(
      'the active instance to be applying',
      async () => (await readModel(f)).rows > 300,
      GENEROUS_MS,
    )
    const mark = { active: active.output().length, standby: standby.output().length }
    proxy.partition()
    const cutAt = Date.now()
    const [took, noticed] = await Promise.all([
      timeUntil(standby, RUNNING, mark.standby, cutAt, 'the standby to take over'),
      timeUntil(active, LOST, mark.active, cutAt, 'the cut-off instance to notice'),
    ])
    console.log(
      `partition: standby took the slot ${took} ms after the cut; the cut-off instance gave it up after ${noticed} ms (stated bound ${STATED_BOUND_MS} ms)`,
    )

    expect(took).toBeLessThan(2 * STATED_BOUND_MS)
    expect(noticed).toBeLessThan(2 * STATED_BOUND_MS)

    await first
    await publishReadings(f, 2000)
    await allApplied(f, [standby])

    proxy.heal()
    await waitFor(
      'the healed instance to stand by',
      () => seen(active, STANDING_BY, mark.active) > 0,
      GENEROUS_MS,
      () => active.output().slice(mark.active),
    )
    await publishReadings(f, 500)
    await allApplied(f, [active, standby])
    await expectExactlyOnce(f)
    expect(seen(active, RUNNING, mark.active)).toBe(0)
  })
})
