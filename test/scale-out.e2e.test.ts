import { inspect } from 'node:util'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Runtime } from '../app/runtime.ts'
import { createPublisher, eventHeaders, type Publisher } from '../infra/publisher.ts'
import { slotsOf } from '../processors/partitions.ts'
import { PROCESSOR_NAMES, type ProcessorName } from '../processors/processor-registry.ts'
import type { FleetEvent } from '../schemas/events.ts'
import { HybridLogicalClock } from '../schemas/hlc.ts'
import { partitionMapping, partitionOf } from '../schemas/subjects.ts'
import { freshDatabase, startNatsServer, type NatsServer } from './harness/test-servers.ts'
import {
  allCaughtUp,
  dumpReadModels,
  readingDraft,
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

const PARTITIONS = 4

/** nats-server with the partition mapping nats.conf would carry, in the global account. */
function partitionedServer(): Promise<NatsServer> {
  const m = partitionMapping(PARTITIONS)
  return startNatsServer({
    extraConfig: `mappings: { ${JSON.stringify(m.from)}: ${JSON.stringify(m.to)} }`,
  })
}

/** A partitioned server, a database set up for it, and `fleetstream run` processes on both. */
interface Site {
  nats: NatsServer
  rt: Runtime
  env: Record<string, string>
  processes: CliProcess[]
}

async function site(settings: Record<string, string> = {}): Promise<Site> {
  const nats = await partitionedServer()
  const db = await freshDatabase()
  const extra = {
    ...settings,
    FLEET_PARTITIONS: String(PARTITIONS),
    PROCESSOR_BATCH_SIZE: '50',
    PROCESSOR_BATCH_LINGER_MS: '2',
    ALERT_RULES_FILE: await rulesFile(),
    SENSOR_INACTIVITY_TIMEOUT_SECONDS: '30',
    // Longer than this file can take: both servers deduplicate every re-send, however slowly a
    // busy machine publishes. With the default 120 s, a batch that took longer than that to
    // publish had one server store a re-send the other still deduplicated, and from there on the
    // two streams numbered every event differently (every later stream_seq differed).
    FLEET_DUPLICATE_WINDOW_SECONDS: String(24 * 3600),
  }
  const rt = await testRuntime(testConfig(nats.url, db, extra))
  return { nats, rt, env: testEnv(nats.url, db, extra), processes: [] }
}

/** How many times the processes of `s` logged `msg`. */
function logged(s: Site, msg: string): number {
  const line = `"msg":${JSON.stringify(msg)}`
  return s.processes.flatMap((p) => p.output().split('\n')).filter((l) => l.includes(line)).length
}

function startInstance(s: Site): CliProcess {
  const p = spawnCli(['run', '--no-clock'], s.env)
  s.processes.push(p)
  return p
}

/** The consumers of every processor: one per partition for readings, one each for the others. */
function consumerNames(s: Site): string[] {
  return PROCESSOR_NAMES.flatMap((n) => slotsOf(s.rt.processors[n], s.rt.config).map((x) => x.key))
}

/**
 * How many partitions of `processor` each instance owns now (the slot locks each instance's
 * Postgres session holds), ascending: '2,2' when two instances share four partitions.
 */
async function slotsPerInstance(s: Site, processor: ProcessorName): Promise<string> {
  const keys = slotsOf(s.rt.processors[processor], s.rt.config).map((x) => x.key)
  const r = await s.rt.pool.query<{ n: number }>(
    `select count(*)::int as n from pg_locks
      where locktype = 'advisory' and granted and objsubid = 2
        and database = (select oid from pg_database where datname = current_database())
        and classid = hashtext('fleetstream-processor')::oid
        and objid in (select hashtext(k)::oid from unnest($1::text[]) as k)
      group by pid order by 1`,
    [keys],
  )
  return r.rows.map((row) => row.n).join(',')
}

/** Waits until every processor's partitions are shared out as `shares` says. */
async function sharedAs(s: Site, shares: string): Promise<void> {
  const now = async () =>
    (await Promise.all(PROCESSOR_NAMES.map((p) => slotsPerInstance(s, p)))).join(' | ')
  const want = PROCESSOR_NAMES.map(() => shares).join(' | ')
  await waitFor(`partitions shared as ${shares}`, async () => (await now()) === want, 60_000, now)
}

/**
 * A fleet, fixed in advance (ids and HLCs), so two sites can be given exactly the same input.
 * Stream time runs 10 s a round (a gateway clock in the past, so no HLC is ahead of the server):
 * registrations, readings (some devices hot enough to raise and clear alerts), heartbeats with a
 * falling battery, devices that fall silent for a while (unknown, silent alerts) and come back,
 * a clock tick into every partition per round, and re-sends of every 13th event, as QoS-1
 * devices do.
 */
function fleetInput(rt: Runtime, devices: number, rounds: { from: number; to: number }) {
  const start = Date.now() - 3_600_000
  const publisher = createPublisher(rt.js, {
    clock: new HybridLogicalClock({
      node: 'gw-1',
      maxOffsetMs: 500,
      physicalNow: () => start + simulated,
    }),
  })
  let simulated = rounds.from * 10_000
  const events: { event: FleetEvent; partition?: number }[] = []
  for (let d = 0; d < devices && rounds.from === 0; d++) {
    events.push({
      event: publisher.stamp({
        type: 'sensor.registered',
        deviceId: `unit-${d}`,
        data: { site: 'plant-1', model: 'fs-th-200', firmware: '1.4.2' },
      }),
    })
  }
  for (let r = rounds.from; r < rounds.to; r++) {
    simulated = r * 10_000
    for (let d = 0; d < devices; d++) {
      const silent = d % 11 === 3 && r % 40 >= 10 && r % 40 < 20
      if (silent) continue
      const hot = d % 7 === 0 && r % 10 < 5
      events.push({
        event: publisher.stamp(readingDraft(`unit-${d}`, hot ? 45 + (r % 3) : 20 + ((d + r) % 9))),
      })
      if (r % 10 === 9) {
        events.push({
          event: publisher.stamp({
            type: 'heartbeat.received',
            deviceId: `unit-${d}`,
            data: { batteryPercent: Math.max(0, 60 - r - (d % 50)) },
          }),
        })
      }
    }
    simulated = r * 10_000 + 9_999
    const at = start + (r + 1) * 10_000
    for (let p = 0; p < PARTITIONS; p++) {
      events.push({
        event: publisher.stamp({ ...tickDraft(at), eventId: `tick-${at}-p${p}` }),
        partition: p,
      })
    }
  }
  const resends = events.filter((_, i) => i % 13 === 5)
  return [...events, ...resends]
}

/** The read models, leaving out what the storing server's clock decided (two servers here). */
function dumpAcross(s: Site) {
  return dumpReadModels(s.rt, ['ingested_at'])
}

/** What the storing server holds: how many messages, and the last sequence. */
async function streamState(s: Site): Promise<string> {
  const { state } = await s.rt.jsm.streams.info(s.rt.config.streams.events)
  return `${state.messages} messages, last sequence ${state.last_seq}`
}

/** A row with every column, -0 and dates as they are (JSON would hide both). */
function show(row: unknown): string {
  return inspect(row, { depth: 4, breakLength: Infinity, maxStringLength: Infinity })
}

/**
 * Every read-model table of site `two` equals site `one`'s; resolves with site `one`'s tables. On a
 * difference, says which rows differ (the first few only in each, every column) and what each
 * server stored: the matcher's diff of thousands of rows is cut short by its output budget and
 * says "Compared values have no visual difference".
 */
async function expectSameTables(one: Site, two: Site): Promise<Record<string, unknown[]>> {
  const [a, b] = await Promise.all([dumpAcross(one), dumpAcross(two)])
  for (const t of Object.keys(a)) {
    const rowsA = a[t] ?? []
    const rowsB = b[t] ?? []
    const inA = new Set(rowsA.map(show))
    const inB = new Set(rowsB.map(show))
    const onlyA = rowsA.map(show).filter((r) => !inB.has(r))
    const onlyB = rowsB.map(show).filter((r) => !inA.has(r))
    if (onlyA.length === 0 && onlyB.length === 0 && rowsA.length === rowsB.length) continue
    const [streamA, streamB] = await Promise.all([streamState(one), streamState(two)])
    throw new Error(
      [
        `${t} differs: one instance ${rowsA.length} rows, two instances ${rowsB.length} rows; ` +
          `${onlyA.length} only with one instance, ${onlyB.length} only with two`,
        `stream of one instance: ${streamA}; of two instances: ${streamB}`,
        'first rows only with one instance:',
        ...onlyA.slice(0, 5),
        'first rows only with two instances:',
        ...onlyB.slice(0, 5),
      ].join('\n'),
    )
  }
  return a
}

/** Readings in the read model, and how many distinct event ids they have. */
async function readingRows(s: Site): Promise<{ rows: number; distinct: number }> {
  const r = await s.rt.pool.query<{ rows: number; distinct: number }>(
    'select count(*)::int as rows, count(distinct event_id)::int as distinct from readings',
  )
  return r.rows[0]!
}

function distinctReadings(input: readonly { event: FleetEvent }[]): number {
  return new Set(
    input.filter((e) => e.event.type === 'reading.recorded').map((e) => e.event.eventId),
  ).size
}

/**
 * Publishes in order, one at a time, so that both sites store the same sequence. Resolves with
 * what the server did with each event: the sequence it stored it at, or `dup <seq>` when it
 * deduplicated it (the sequence of the copy it holds).
 */
async function publishAll(
  publisher: Publisher,
  input: readonly { event: FleetEvent; partition?: number }[],
): Promise<string[]> {
  const stored: string[] = []
  for (const e of input) {
    const r = await publisher.publishEvent(
      e.event,
      e.partition === undefined ? {} : { partition: e.partition },
    )
    stored.push(r.duplicate ? `dup ${r.seq}` : String(r.seq))
  }
  return stored
}

/**
 * Where two servers given the same input stored it differently, if they did: the read models
 * name stream sequences, so they can only be compared across two servers that agree.
 */
function divergence(
  input: readonly { event: FleetEvent }[],
  one: readonly string[],
  two: readonly string[],
): string | undefined {
  const i = one.findIndex((x, k) => x !== two[k])
  if (i < 0) return undefined
  return `event ${i} (${input[i]?.event.eventId}): one instance's server ${one[i]}, two instances' server ${two[i]}`
}

// Whole processes on two servers each, beside other test files on two cores: minutes, not seconds.
describe(
  'partitioned scale-out over 4 partitions, shared by instances',
  { timeout: 240_000 },
  () => {
    let one: Site
    let two: Site
    beforeAll(async () => {
      // The second site's instances start together: with a join grace no start can outrun, the
      // first to join leaves the second's partitions to it (and logs at info, to show it).
      ;[one, two] = await Promise.all([
        site(),
        site({ LOG_LEVEL: 'info', PROCESSOR_JOIN_GRACE_MS: '10000' }),
      ])
    })
    afterAll(async () => {
      for (const s of [one, two]) {
        for (const p of s.processes) p.child.kill('SIGKILL')
        await Promise.all(s.processes.map((p) => p.exited))
        await s.rt.close()
        await s.nats.cleanup()
      }
    })

    it('setup gives each processor one consumer per partition', () => {
      expect(consumerNames(one)).toEqual(
        PROCESSOR_NAMES.flatMap((n) => [0, 1, 2, 3].map((p) => `${n}-p${p}`)),
      )
    })

    let first: { event: FleetEvent; partition?: number }[] = []

    it('two instances started together share 4 partitions without a hand-over and end with the same tables as one instance', async () => {
      first = fleetInput(one.rt, 120, { from: 0, to: 30 })
      startInstance(one)
      startInstance(two)
      startInstance(two)
      // Both instances of the second site own two partitions of each processor.
      await sharedAs(two, '2,2')
      const [storedOne, storedTwo] = await Promise.all([
        publishAll(testPublisher(one.rt), first),
        publishAll(testPublisher(two.rt), first),
      ])
      expect(divergence(first, storedOne, storedTwo)).toBeUndefined()
      await Promise.all([
        allCaughtUp(one.rt, consumerNames(one), 180_000),
        allCaughtUp(two.rt, consumerNames(two), 180_000),
      ])
      await sharedAs(two, '2,2')
      // Started together, they shared the partitions out without handing any over.
      expect(logged(two, 'handing the slot over to another instance')).toBe(0)

      // Stored under their partition by the server's mapping: every partition got some.
      const info = await two.rt.jsm.streams.info(two.rt.config.streams.events, {
        subjects_filter: 'fleet.events.*.*.reading',
      })
      const partitions = new Set(Object.keys(info.state.subjects ?? {}).map((s) => s.split('.')[2]))
      expect([...partitions].sort()).toEqual(['0', '1', '2', '3'])

      const a = await expectSameTables(one, two)
      expect(await readingRows(two)).toEqual({
        rows: distinctReadings(first),
        distinct: distinctReadings(first),
      })
      // The input exercised what stream time decides: sensors fell silent and raised alerts.
      const history = a.sensor_status_history as { to_status: string }[]
      expect(history.filter((h) => h.to_status === 'unknown').length).toBeGreaterThan(0)
      const alerts = a.alerts as { rule_id: string }[]
      expect(new Set(alerts.map((x) => x.rule_id))).toEqual(
        new Set(['temperature-high', 'sensor-silent', 'battery-low']),
      )
    })

    it('an instance killed mid-run hands its partitions over: nothing lost, nothing doubled', async () => {
      const second = fleetInput(one.rt, 120, { from: 30, to: 70 })
      const before = (await readingRows(two)).rows
      const publishing = publishAll(testPublisher(two.rt), second)
      const storedOne = await publishAll(testPublisher(one.rt), second)
      await waitFor(
        'the second batch of readings to be under way',
        async () => (await readingRows(two)).rows > before + 600,
      )
      const victim = two.processes[0]!
      victim.child.kill('SIGKILL')
      expect(await victim.exited).toBe(137)
      // The survivor takes the victim's partitions of every processor.
      await sharedAs(two, '4')
      expect(divergence(second, storedOne, await publishing)).toBeUndefined()
      await Promise.all([
        allCaughtUp(one.rt, consumerNames(one), 180_000),
        allCaughtUp(two.rt, consumerNames(two), 180_000),
      ])

      const total = distinctReadings([...first, ...second])
      expect(await readingRows(two)).toEqual({ rows: total, distinct: total })
      await expectSameTables(one, two)
    })

    it('rebuilds each processor blue/green across its partitions while the survivor runs; tables equal one instance', async () => {
      const third = fleetInput(one.rt, 120, { from: 80, to: 95 })
      const publishing = Promise.all([
        publishAll(testPublisher(one.rt), third),
        publishAll(testPublisher(two.rt), third),
      ])
      for (const name of PROCESSOR_NAMES) {
        const r = await runCli(['rebuild', name, '--drop-retired', '--json'], two.env, 120_000)
        expect(r.code, r.output).toBe(0)
        expect(r.output).toContain('"retired":null')
      }
      const [storedOne, storedTwo] = await publishing
      expect(divergence(third, storedOne, storedTwo)).toBeUndefined()
      await Promise.all([
        allCaughtUp(one.rt, consumerNames(one), 180_000),
        allCaughtUp(two.rt, consumerNames(two), 180_000),
      ])
      await expectSameTables(one, two)
    })

    it("parks an event published straight into a partition that is not its device's", async () => {
      const event = testPublisher(one.rt).stamp(readingDraft('unit-0', 22))
      const wrong = (partitionOf('unit-0', PARTITIONS) + 1) % PARTITIONS
      await one.rt.js.publish(`fleet.events.${wrong}.unit-0.reading`, JSON.stringify(event), {
        msgID: event.eventId,
        headers: eventHeaders(event),
      })
      let entries: { processor: string; reason: string; detail: string }[] = []
      await waitFor('every processor to park it', async () => {
        const list = await runCli(['dlq', 'list', '--json'], one.env)
        entries = JSON.parse(list.output) as typeof entries
        return entries.length === 3
      })
      expect(entries.map((e) => [e.processor, e.reason]).sort()).toEqual([
        ['alerts', 'subject-mismatch'],
        ['readings', 'subject-mismatch'],
        ['sensor-status', 'subject-mismatch'],
      ])
      expect(entries[0]?.detail).toContain(
        `subject partition must be ${partitionOf('unit-0', PARTITIONS)} for device 'unit-0'`,
      )
      const r = await one.rt.pool.query('select 1 from readings where event_id = $1', [
        event.eventId,
      ])
      expect(r.rowCount).toBe(0)
    })

    it('refuses a partition count that disagrees with the stored subjects, naming the setting', async () => {
      const unpartitioned = await runCli(['setup'], { ...two.env, FLEET_PARTITIONS: '0' })
      expect(unpartitioned.code).not.toBe(0)
      expect(unpartitioned.output).toMatch(
        /FLEET_EVENTS holds partitioned subjects but 'FLEET_PARTITIONS' is 0.*e\.g\. 'fleet\.events\.[0-3]\./,
      )
      // `run` looks at the newest event alone (a scan of the stream costs the server too much for
      // every processor's start: processors/partitions.ts), and stops all the same.
      const run = await runCli(['run', 'readings', '--no-clock'], {
        ...two.env,
        FLEET_PARTITIONS: '0',
      })
      expect(run.code).not.toBe(0)
      expect(run.output).toMatch(
        /FLEET_EVENTS holds partitioned subjects but 'FLEET_PARTITIONS' is 0.*e\.g\. 'fleet\.events\.[0-3]\./,
      )
      // Fewer than the mapping makes: a warning (a device could cause the same sight by publishing
      // straight into partition 2 of a 2-partition stream; set-up must not stop for that).
      const fewer = await runCli(['setup'], { ...two.env, FLEET_PARTITIONS: '2' })
      expect(fewer.output).toMatch(/FLEET_EVENTS holds partition 2 but 'FLEET_PARTITIONS' is 2/)
    })
  },
)
