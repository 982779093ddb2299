import { headers, type MsgHdrs } from '@nats-io/transport-node'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { DeadLetterEntry } from '../processors/dlq/inspect.ts'
import type { Runtime } from '../app/runtime.ts'
import { PROCESSOR_NAMES } from '../processors/processor-registry.ts'
import { startProcessor } from '../processors/runner/runner.ts'
import { type RunningProcessor } from '../processors/runner/types.ts'
import { readingsProcessor } from '../processors/readings-processor.ts'
import { Headers } from '../schemas/subjects.ts'
import { jetstream } from '@nats-io/jetstream'
import { isPermissionViolation } from '../infra/failures.ts'
import { ensureStreams } from '../infra/streams.ts'
import {
  startRoleNatsServer,
  type NatsServer,
  type RoleNatsServer,
} from './harness/test-servers.ts'
import {
  allCaughtUp,
  cliSystem,
  readingDraft,
  runCli,
  spawnCli,
  testPublisher,
  waitFor,
  type CliProcess,
  buggyReadings,
  publishRaw,
} from './fixtures.ts'

/** How many DLQ entries each (processor, original stream sequence) has: counted, not a set. */
async function dlqCounts(rt: Runtime): Promise<Map<string, number>> {
  const info = await rt.jsm.streams.info(rt.config.streams.dlq)
  const counts = new Map<string, number>()
  for (let seq = info.state.first_seq; seq <= info.state.last_seq; seq++) {
    const m = await rt.jsm.streams.getMessage(rt.config.streams.dlq, { seq }).catch(() => null)
    if (m === null) continue
    const key = `${m.header.get(Headers.DlqProcessor)} #${m.header.get(Headers.DlqStreamSeq)}`
    counts.set(key, (counts.get(key) ?? 0) + 1)
  }
  return counts
}

/** Publishes raw bytes as a device would; returns the stream sequence. */
async function raw(
  rt: Runtime,
  subject: string,
  body: string | Uint8Array,
  opts: { msgID?: string; headers?: MsgHdrs } = {},
): Promise<number> {
  return (await rt.js.publish(subject, body, opts)).seq
}

async function readingRows(rt: Runtime, deviceId: string): Promise<number> {
  const r = await rt.db
    .selectFrom('readings')
    .select((eb) => eb.fn.countAll<string>().as('n'))
    .where('device_id', '=', deviceId)
    .executeTakeFirstOrThrow()
  return Number(r.n)
}

describe('hostile input: parking is total, bounded and once', () => {
  let nats: NatsServer
  let rt: Runtime
  let env: Record<string, string>
  let running: RunningProcessor[] = []
  beforeAll(async () => {
    ;({ nats, env, rt } = await cliSystem())
    running = PROCESSOR_NAMES.map((n) => startProcessor(rt.processors[n], rt))
  })
  /** Until every processor's checkpoint is at or past `seq`. */
  const everyProcessorPast = (seq: number): Promise<void> =>
    waitFor(
      'every processor to pass the valid events',
      async () => {
        const cps = await rt.db.selectFrom('processor_checkpoints').select('last_seq').execute()
        return cps.length === 3 && cps.every((c) => c.last_seq >= seq)
      },
      60_000,
      () => JSON.stringify(running.map((r) => [r.name, r.stats.checkpoint, r.stats.state])),
    )
  afterAll(async () => {
    await Promise.all(running.map((r) => r.stop()))
    await rt.close()
    await nats.cleanup()
  })

  it('a message that fits FLEET_EVENTS but whose full copy would not fit FLEET_DLQ is parked in bounded form, once per processor, and the processors go on', async () => {
    const max = rt.config.streams.maxMsgBytes
    // ~1,200 headers `Nats-X: y` and a body that is not JSON: about 13 KB.
    const many = headers()
    for (let i = 0; i < 1200; i++) many.append('Nats-X', 'y')
    const wide = await raw(rt, 'fleet.events.h-1.reading', 'not json', {
      msgID: 'hostile-wide',
      headers: many,
    })
    // A body near max_msg_size, with many headers beside it.
    const some = headers()
    for (let i = 0; i < 60; i++) some.append(`Nats-Y-${i}`, 'v')
    const big = await raw(rt, 'fleet.events.h-1.reading', 'x'.repeat(max - 1400), {
      msgID: 'hostile-big',
      headers: some,
    })
    // A subject token that reads like a header the server would obey if it were copied as is.
    const rollup = await raw(rt, 'fleet.events.Nats-Rollup:all.reading', 'not json', {
      msgID: 'hostile-rollup',
    })
    const publisher = testPublisher(rt)
    let last = 0
    for (let i = 0; i < 5; i++) last = (await publisher.publish(readingDraft('h-2', 20 + i))).seq

    await everyProcessorPast(last)
    expect(await readingRows(rt, 'h-2')).toBe(5)
    const status = await rt.db
      .selectFrom('sensor_status')
      .select('device_id')
      .where('device_id', '=', 'h-2')
      .execute()
    expect(status).toHaveLength(1)

    const counts = await dlqCounts(rt)
    for (const seq of [wide, big, rollup]) {
      for (const p of PROCESSOR_NAMES) expect(counts.get(`${p} #${seq}`), `${p} #${seq}`).toBe(1)
    }

    // The cut entry says so and points at the original.
    const entries = JSON.parse(
      (await runCli(['dlq', 'list', '--json'], env)).output,
    ) as DeadLetterEntry[]
    const e = entries.find((x) => x.streamSeq === wide && x.processor === 'readings')
    expect(e).toBeDefined()
    const shown = await runCli(['dlq', 'show', String(e!.seq)], env)
    expect(shown.code, shown.output).toBe(0)
    expect(shown.output).toContain(`origin:     FLEET_EVENTS #${wide}`)
    // 1,200 headers and its Nats-Msg-Id
    expect(shown.output).toMatch(/cut: +headers kept \d+ of 1201 \(whole in FLEET_EVENTS #\d+/)
  })

  it('a header block the NATS client refuses (a raw HPUB) is parked once per processor as invalid-headers, and the processors go on', async () => {
    const before = (await rt.jsm.streams.info(rt.config.streams.events)).state.last_seq
    // nats-server stores both; nats.js throws on reading their headers: a space opening a
    // header name, a lone LF inside a value.
    await publishRaw(nats.url, [
      {
        subject: 'fleet.events.h-3.reading',
        header: 'NATS/1.0\r\nNats-Msg-Id: hostile-space\r\n Fleet-Hlc: 2\r\n\r\n',
      },
      {
        subject: 'fleet.events.h-3.reading',
        header: 'NATS/1.0\r\nNats-Msg-Id: hostile-lf\r\nFleet-Hlc: 3\nX: 4\r\n\r\n',
      },
    ])
    const refused = [before + 1, before + 2]
    const publisher = testPublisher(rt)
    let last = 0
    for (let i = 0; i < 3; i++) last = (await publisher.publish(readingDraft('h-4', 20 + i))).seq
    expect(last).toBe(before + 5)

    await everyProcessorPast(last)
    expect(await readingRows(rt, 'h-4')).toBe(3)
    expect(await readingRows(rt, 'h-3')).toBe(0)
    const counts = await dlqCounts(rt)
    for (const seq of refused) {
      for (const p of PROCESSOR_NAMES) expect(counts.get(`${p} #${seq}`), `${p} #${seq}`).toBe(1)
    }
    const entries = JSON.parse(
      (await runCli(['dlq', 'list', '--json'], env)).output,
    ) as DeadLetterEntry[]
    const mine = entries.filter((e) => refused.includes(e.streamSeq))
    expect(mine).toHaveLength(2 * PROCESSOR_NAMES.length)
    for (const e of mine) {
      expect(e.reason).toBe('invalid-headers')
      expect(e.detail).toContain('a header name must be visible ASCII')
    }
    // The operator's view of the original does not fail on it either.
    const shown = await runCli(['events', 'show', String(refused[0])], env)
    expect(shown.code, shown.output).toBe(0)
  })

  it('headers a device sets cannot change the DLQ dedup id of an entry', async () => {
    const seqs: number[] = []
    for (const id of ['dedup-a', 'dedup-b']) {
      const h = headers()
      h.set('Fleet-Dlq-Original-Nats-Msg-Id', 'same')
      h.set('X-Nats-Msg-Id', 'same')
      seqs.push(
        await raw(rt, 'fleet.events.h-3.reading', `not json ${id}`, { msgID: id, headers: h }),
      )
    }
    await allCaughtUp(rt, PROCESSOR_NAMES)
    const counts = await dlqCounts(rt)
    for (const seq of seqs) {
      for (const p of PROCESSOR_NAMES) expect(counts.get(`${p} #${seq}`), `${p} #${seq}`).toBe(1)
    }
  })

  it('a device-set Fleet-Redrive-For header makes no processor skip the event', async () => {
    const publisher = testPublisher(rt, 'hostile-gw')
    for (const [device, marker] of [
      ['r-1', 'readings'],
      ['r-2', 'nobody'],
    ] as const) {
      for (const value of [95, 96, 97]) {
        const event = publisher.stamp(readingDraft(device, value))
        const h = headers()
        h.set(Headers.Hlc, event.hlc)
        h.set('Fleet-Redrive-For', marker)
        h.set('Fleet-Redrive-Of', '1')
        await raw(rt, `fleet.events.${device}.reading`, JSON.stringify(event), {
          msgID: event.eventId,
          headers: h,
        })
      }
    }
    await allCaughtUp(rt, PROCESSOR_NAMES)
    for (const device of ['r-1', 'r-2']) {
      expect(await readingRows(rt, device), device).toBe(3)
      const status = await rt.db
        .selectFrom('sensor_status')
        .select('device_id')
        .where('device_id', '=', device)
        .execute()
      expect(status, device).toHaveLength(1)
      const alerts = await rt.db
        .selectFrom('alerts')
        .select(['rule_id', 'state'])
        .where('device_id', '=', device)
        .execute()
      expect(alerts, device).toEqual([{ rule_id: 'temperature-high', state: 'open' }])
    }
  })
})

describe('operator tools on hostile entries', () => {
  let nats: NatsServer
  let rt: Runtime
  let env: Record<string, string>
  let readings: RunningProcessor
  let status: RunningProcessor
  let deep = 0
  beforeAll(async () => {
    ;({ nats, env, rt } = await cliSystem())
    readings = startProcessor(buggyReadings, rt)
    status = startProcessor(rt.processors['sensor-status'], rt)
    // 5,000 levels of nesting in 10 KB.
    deep = await raw(rt, 'fleet.events.o-1.reading', `${'['.repeat(5000)}${']'.repeat(5000)}`, {
      msgID: 'deep-1',
    })
    const publisher = testPublisher(rt)
    const a = await publisher.publish(readingDraft('o-2', 20))
    // A device that knows its last event id can make the server check it; a copy put back
    // later must not carry that check along.
    const b = publisher.stamp(readingDraft('o-2', 666))
    const h = headers()
    h.set(Headers.Hlc, b.hlc)
    h.set('Nats-Expected-Last-Msg-Id', a.event.eventId)
    await raw(rt, 'fleet.events.o-2.reading', JSON.stringify(b), { msgID: b.eventId, headers: h })
    await publisher.publish(readingDraft('o-3', 666))
    await allCaughtUp(rt, ['readings', 'sensor-status'])
  })
  afterAll(async () => {
    await readings.stop()
    await status.stop()
    await rt.close()
    await nats.cleanup()
  })

  const cli = (...args: string[]) => runCli(['dlq', ...args], env)

  it('list --json and show do not crash on a deeply nested body, and say how they show it', async () => {
    const list = await cli('list', '--json')
    expect(list.code, list.output.slice(0, 2000)).toBe(0)
    const entries = JSON.parse(list.output) as DeadLetterEntry[]
    const e = entries.find((x) => x.streamSeq === deep && x.processor === 'readings')
    expect(typeof e?.body).toBe('string')
    expect(e?.bodyNote).toMatch(/nested deeper than \d+ levels/)
    for (const args of [[], ['--json']]) {
      const shown = await cli('show', String(e!.seq), ...args)
      expect(shown.code, shown.output.slice(0, 2000)).toBe(0)
      expect(shown.output).toMatch(/nested deeper than \d+ levels/)
    }
    expect((await cli('list')).code).toBe(0)
  })

  it('redrive --all copies no Nats-* header, goes past a failing entry and counts it', async () => {
    // An entry whose origin no stream stores: its redrive fails.
    const h = headers()
    h.set(Headers.DlqProcessor, 'readings')
    h.set(Headers.DlqReason, 'invalid-json')
    h.set(Headers.DlqDetail, 'forged')
    h.set(Headers.DlqSubject, 'nowhere.at.all')
    h.set(Headers.DlqStream, 'NOWHERE')
    h.set(Headers.DlqStreamSeq, '1')
    const forged = (await rt.js.publish('fleet.dlq.readings', 'x', { headers: h })).seq

    await readings.stop()
    readings = startProcessor(readingsProcessor, rt) // the fixed deployment
    const r = await cli('redrive', '--all', '--processor', 'readings')
    expect(r.code, r.output).not.toBe(0)
    expect(r.output).toContain(`${forged}`)
    expect(r.output).toMatch(/1 failed/)
    await waitFor('both 666 readings to be applied', async () => {
      const rows = await rt.db
        .selectFrom('readings')
        .select('value')
        .where('value', '=', 666)
        .execute()
      return rows.length === 2
    })
    const left = JSON.parse((await cli('list', '--json')).output) as DeadLetterEntry[]
    expect(left.filter((x) => x.seq === forged)).toHaveLength(1)
  })
})

describe('a processor killed between parking and acking', () => {
  let nats: NatsServer
  let rt: Runtime
  let env: Record<string, string>
  let run: CliProcess | undefined
  afterAll(async () => {
    run?.child.kill('SIGKILL')
    await run?.exited
    await rt.close()
    await nats.cleanup()
  })

  it('parks each refused event once per processor across the crash', async () => {
    ;({ nats, env, rt } = await cliSystem())
    run = spawnCli(['run', '--no-clock'], env)
    await allCaughtUp(rt, PROCESSOR_NAMES)
    // Commits wait on this lock: the events are parked, never committed or acked.
    const blocker = await rt.pool.connect()
    await blocker.query('begin')
    await blocker.query('lock table processor_checkpoints in exclusive mode')
    const ids: string[] = []
    for (let i = 0; i < 10; i++) {
      const id = `killed-${i}`
      ids.push(id)
      await raw(rt, `fleet.events.k-${i}.reading`, `not json ${i}`, { msgID: id })
    }
    // Each processor parks the refused events of the batch it took, then its commit waits on the
    // lock, and the batches after it wait for that commit: how many of the 10 a processor's first
    // batch holds depends on how they arrived (all of them on an idle machine, not on a busy one).
    // The crash comes once every processor has parked and is waiting; the rest were neither
    // parked nor acked, which the restart must handle too.
    await waitFor('every processor to park what it took and wait on the lock', async () => {
      const parked = new Set([...(await dlqCounts(rt)).keys()].map((k) => k.split(' #')[0]))
      const { rows } = await rt.pool.query<{ n: number }>(
        `select count(*)::integer as n from pg_locks
         where not granted and relation = 'processor_checkpoints'::regclass`,
      )
      return (
        PROCESSOR_NAMES.every((p) => parked.has(p)) && (rows[0]?.n ?? 0) >= PROCESSOR_NAMES.length
      )
    })
    run.child.kill('SIGKILL')
    await run.exited
    await blocker.query('rollback')
    blocker.release()

    run = spawnCli(['run', '--no-clock'], env)
    await allCaughtUp(rt, PROCESSOR_NAMES)
    const counts = await dlqCounts(rt)
    expect([...counts.values()].reduce((a, b) => a + b, 0)).toBe(ids.length * 3)
    for (let seq = 1; seq <= ids.length; seq++) {
      for (const p of PROCESSOR_NAMES) expect(counts.get(`${p} #${seq}`), `${p} #${seq}`).toBe(1)
    }
  })
})

describe('a DLQ that is not there', () => {
  let nats: NatsServer
  let rt: Runtime
  let readings: RunningProcessor | undefined
  afterAll(async () => {
    await readings?.stop()
    await rt.close()
    await nats.cleanup()
  })

  it('holds the processor at the refused event, retrying, until the DLQ is back; then it is parked once and the rest applied', async () => {
    ;({ nats, rt } = await cliSystem())
    await rt.jsm.streams.delete(rt.config.streams.dlq)
    readings = startProcessor(readingsProcessor, rt)
    const bad = await raw(rt, 'fleet.events.u-1.reading', 'not json', { msgID: 'unparked-1' })
    const publisher = testPublisher(rt)
    const good = await publisher.publish(readingDraft('u-2', 21))
    await waitFor(
      'the session to end on the failed park',
      () => readings!.stats.state === 'backing-off',
    )
    expect(await readingRows(rt, 'u-2')).toBe(0)

    await ensureStreams(rt.jsm, rt.config.streams)
    await waitFor(
      'the checkpoint to pass the good event',
      () => readings!.stats.checkpoint >= good.seq,
    )
    expect(await readingRows(rt, 'u-2')).toBe(1)
    const counts = await dlqCounts(rt)
    expect([...counts.entries()]).toEqual([[`readings #${bad}`, 1]])
  })
})

describe('redrive subjects on the role-scoped server', () => {
  let ns: RoleNatsServer
  afterAll(async () => {
    await ns.cleanup()
  })

  it('a device (here its gateway) may not publish a redrive; an operator may, and FLEET_EVENTS stores it', async () => {
    ns = await startRoleNatsServer()
    const admin = await ns.admin()
    await admin.jsm.streams.add({ name: 'FLEET_EVENTS', subjects: ['fleet.events.>'] })
    const device = await ns.connect('gateway')
    const subject = 'fleet.events.dev-1.reading.redrive.readings'
    const refused = await jetstream(device)
      .publish(subject, '{}')
      .then(
        () => undefined,
        (err: unknown) => err,
      )
    expect(isPermissionViolation(refused), String(refused)).toBe(true)
    const pa = await jetstream(admin.nc).publish(subject, '{}')
    expect(pa.stream).toBe('FLEET_EVENTS')
    await device.close()
    await admin.nc.close()
  })
})
