import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import {
  AckPolicy,
  DeliverPolicy,
  type ConsumerInfo,
  type JsMsg,
  type OrderedConsumerOptions,
} from '@nats-io/jetstream'
import { headers, nanos } from '@nats-io/transport-node'
import { AsyncLocalStorageContextManager } from '@opentelemetry/context-async-hooks'
import { W3CTraceContextPropagator } from '@opentelemetry/core'
import { context, propagation, trace, TraceFlags } from '@opentelemetry/api'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { ShownEvent } from '../cli/stored-events.ts'
import type { Runtime } from '../app/runtime.ts'
import type { PublishResult } from '../infra/publisher.ts'
import { PROCESSOR_NAMES } from '../processors/processor-registry.ts'
import { startProcessor } from '../processors/runner/runner.ts'
import { type RunningProcessor } from '../processors/runner/types.ts'
import { decodeHlc } from '../schemas/hlc.ts'
import { subjectMatches } from '../schemas/subjects.ts'
import type { NatsServer } from './harness/test-servers.ts'
import {
  allCaughtUp,
  cliSystem,
  readingDraft,
  repoRoot,
  runCli,
  spawnCli,
  testPublisher,
  tickDraft,
  waitFor,
} from './fixtures.ts'

const EVENTS = 'FLEET_EVENTS'

describe('inspecting the stream: fleetstream events, and the README nats CLI section', () => {
  let nats: NatsServer
  let rt: Runtime
  let env: Record<string, string>
  let running: RunningProcessor[] = []
  /** What this file published itself, beside the simulated fleet. */
  let registered: PublishResult
  let statusChanged: PublishResult
  let readingsOfA: PublishResult[]
  let garbageSeq: number
  let invalidSeq: number

  beforeAll(async () => {
    ;({ nats, env, rt } = await cliSystem())

    // A fleet through the real CLI, then events whose every field this file knows.
    const sim = await runCli(
      [
        'simulate',
        ...['--devices', '3', '--rate', '200', '--duration', '1', '--duplicates', '0'],
        ...['--seed', '7', '--json'],
      ],
      env,
    )
    expect(sim.code, sim.output).toBe(0)

    const publisher = testPublisher(rt, 'gw-1')
    context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable())
    propagation.setGlobalPropagator(new W3CTraceContextPropagator())
    try {
      const span = {
        traceId: '4bf92f3577b34da6a3ce929d0e0e4736',
        spanId: '00f067aa0ba902b7',
        traceFlags: TraceFlags.SAMPLED,
      }
      registered = await context.with(trace.setSpanContext(context.active(), span), () =>
        publisher.publish({
          type: 'sensor.registered',
          deviceId: 'dev-a',
          data: { site: 'site-001', model: 'fs-th-200', firmware: '1.0.0' },
        }),
      )
    } finally {
      propagation.disable()
      context.disable()
    }
    // Two hot readings in a row raise temperature-high: a notification goes out.
    readingsOfA = []
    for (const v of [60, 61, 20, 21])
      readingsOfA.push(await publisher.publish(readingDraft('dev-a', v)))

    statusChanged = await publisher.publish({
      type: 'status.changed',
      deviceId: 'dev-a',
      data: { status: 'maintenance', reason: 'battery swap' },
      causedBy: registered.event,
    })
    const h = headers()
    h.set('Fleet-Hlc', '1795000000000-000000-gw')
    garbageSeq = (
      await rt.js.publish('fleet.events.dev-b.reading', '{"not": json', {
        msgID: 'garbage-1',
        headers: h,
      })
    ).seq
    const invalid = {
      ...publisher.stamp(readingDraft('dev-b', 1)),
      data: { metric: 'temperature', value: 'hot', unit: 'C' },
    }
    invalidSeq = (
      await rt.js.publish('fleet.events.dev-b.reading', JSON.stringify(invalid), {
        msgID: invalid.eventId,
      })
    ).seq
    await publisher.publish(tickDraft(Date.now()))

    running = PROCESSOR_NAMES.map((n) => startProcessor(rt.processors[n], rt))
    await allCaughtUp(rt, PROCESSOR_NAMES)
    await waitFor('an alert notification', async () => {
      const info = await rt.jsm.streams.info(rt.config.streams.notifications)
      return info.state.messages > 0
    })
    // A copy put back from the DLQ, so FLEET_EVENTS holds every header the README names.
    const parked = JSON.parse((await runCli(['dlq', 'list', '--json'], env)).output) as {
      seq: number
    }[]
    const redrive = await runCli(['dlq', 'redrive', '--seq', String(parked[0]!.seq)], env)
    expect(redrive.code, redrive.output).toBe(0)
    await allCaughtUp(rt, PROCESSOR_NAMES)
  })

  afterAll(async () => {
    await Promise.all(running.map((p) => p.stop()))
    await rt.close()
    await nats.cleanup()
  })

  const cli = (...args: string[]) => runCli(['events', ...args], env)
  const jsonLines = (output: string) =>
    output
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as ShownEvent)

  describe('fleetstream events show', () => {
    it('shows the envelope, the HLC as a time, the headers, the sequence and the time stored', async () => {
      const { seq, event } = statusChanged
      const r = await cli('show', String(seq))
      expect(r.code, r.output).toBe(0)
      const hlc = decodeHlc(event.hlc)
      const lines = r.output.split('\n')
      expect(lines[0]).toMatch(
        new RegExp(`^seq: {9}${seq} \\(stored \\d{4}-\\d\\d-\\d\\dT[\\d:.]+Z\\)$`),
      )
      expect(lines).toEqual(
        expect.arrayContaining([
          'subject:     fleet.events.dev-a.status',
          'type:        status.changed (version 1)',
          `eventId:     ${event.eventId}`,
          'deviceId:    dev-a',
          `hlc:         ${event.hlc} (${new Date(hlc.wallMs).toISOString()}, counter ${hlc.logical}, node gw-1)`,
          `correlation: ${registered.event.eventId}`,
          `causation:   ${registered.event.eventId}`,
          'data:        {"status":"maintenance","reason":"battery swap"}',
          'headers:',
          `  Nats-Msg-Id: ${event.eventId}`,
          `  Fleet-Hlc: ${event.hlc}`,
          `  Fleet-Correlation-Id: ${registered.event.eventId}`,
          `  Fleet-Causation-Id: ${registered.event.eventId}`,
          '  Fleet-Event-Type: status.changed',
        ]),
      )

      const json = await cli('show', String(registered.seq), '--json')
      expect(json.code, json.output).toBe(0)
      const shown = JSON.parse(json.output) as ShownEvent
      const reg = decodeHlc(registered.event.hlc)
      expect(shown).toMatchObject({
        seq: registered.seq,
        subject: 'fleet.events.dev-a.registered',
        ok: true,
        event: registered.event,
        hlc: {
          value: registered.event.hlc,
          time: new Date(reg.wallMs).toISOString(),
          counter: reg.logical,
          node: 'gw-1',
        },
        headers: {
          'Nats-Msg-Id': registered.event.eventId,
          'Fleet-Event-Type': 'sensor.registered',
          traceparent: '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01',
        },
      })
      expect(Date.parse(shown.storedAt)).toBeGreaterThanOrEqual(reg.wallMs - 1000)
    })

    it('shows an event that does not decode with why and its raw body', async () => {
      const r = await cli('show', String(garbageSeq))
      expect(r.code, r.output).toBe(0)
      expect(r.output).toContain('subject:     fleet.events.dev-b.reading')
      expect(r.output).toMatch(/\nundecodable: invalid-json: body is not JSON: .+\n/)
      expect(r.output).toContain(
        'hlc:         1795000000000-000000-gw (2026-11-18T11:06:40.000Z, counter 0, node gw) from the Fleet-Hlc header',
      )
      expect(r.output).toContain('body:        {"not": json')
      expect(r.output).toContain('  Nats-Msg-Id: garbage-1')

      const json = await cli('show', String(invalidSeq), '--json')
      expect(json.code, json.output).toBe(0)
      const shown = JSON.parse(json.output) as ShownEvent
      expect(shown).toMatchObject({ seq: invalidSeq, ok: false, reason: 'invalid-event' })
      expect(shown.ok ? '' : shown.detail).toContain("'data.value' must be a number, got 'hot'")
      expect(shown.ok ? '' : shown.body).toContain('"value":"hot"')
    })

    it('a missing sequence and a bad one are bad usage (exit 2), as for dlq show', async () => {
      const last = (await rt.jsm.streams.info(EVENTS)).state.last_seq
      const missing = await cli('show', '99999')
      expect(missing.code).toBe(2)
      expect(missing.output).toContain(
        `fleetstream: no event at sequence 99999 in FLEET_EVENTS: it holds sequences 1 to ${last}`,
      )
      for (const bad of ['abc', '0', '-3']) {
        const r = await cli('show', '--', bad)
        expect(r.code, r.output).toBe(2)
        expect(r.output).toContain(`argument 'seq'. must be an integer >= 1, got '${bad}'`)
      }
    })
  })

  describe('fleetstream events tail', () => {
    it('starts at the newest 10 events by default', async () => {
      const last = (await rt.jsm.streams.info(EVENTS)).state.last_seq
      const r = await cli('tail', '--limit', '3', '--json')
      expect(r.code, r.output).toBe(0)
      expect(jsonLines(r.output).map((e) => e.seq)).toEqual([last - 9, last - 8, last - 7])
    })

    it('filters by device and kind, starting at the newest matching events', async () => {
      const r = await cli(
        'tail',
        '--device',
        'dev-a',
        '--kind',
        'reading',
        '--last',
        '2',
        '--limit',
        '2',
        '--json',
      )
      expect(r.code, r.output).toBe(0)
      const shown = jsonLines(r.output)
      expect(shown.map((e) => (e.ok ? e.event.eventId : e.detail))).toEqual(
        readingsOfA.slice(-2).map((p) => p.event.eventId),
      )
      expect(shown.map((e) => e.subject)).toEqual([
        'fleet.events.dev-a.reading',
        'fleet.events.dev-a.reading',
      ])
    })

    it('starts at a sequence or a time, and shows undecodable events in line', async () => {
      const r = await cli('tail', '--from-seq', String(garbageSeq), '--limit', '2')
      expect(r.code, r.output).toBe(0)
      expect(r.output).toContain(
        `FLEET_EVENTS fleet.events.> from sequence ${garbageSeq}, 2 events`,
      )
      // One line per event by default
      const lines = r.output.split('\n').filter((l) => /^ +\d+ {2}\d{4}-/.test(l))
      expect(lines).toHaveLength(2)
      expect(lines[0]).toMatch(
        new RegExp(
          `^ +${garbageSeq} .* {2}fleet\\.events\\.dev-b\\.reading {2}undecodable invalid-json: `,
        ),
      )
      expect(lines[1]).toContain(
        "undecodable invalid-event: 'data.value' must be a number, got 'hot'",
      )

      // and each in full with --verbose.
      const verbose = await cli(
        'tail',
        '--from-seq',
        String(garbageSeq),
        '--limit',
        '2',
        '--verbose',
      )
      expect(verbose.code, verbose.output).toBe(0)
      const blocks = verbose.output.split('\n\n')
      expect(blocks).toHaveLength(2)
      expect(blocks[0]).toContain(`seq:         ${garbageSeq} (stored`)
      expect(blocks[0]).toContain('undecodable: invalid-json')
      expect(blocks[1]).toContain(`seq:         ${invalidSeq} (stored`)
      expect(blocks[1]).toContain(
        "undecodable: invalid-event: 'data.value' must be a number, got 'hot'",
      )

      const ticks = await cli('tail', '--kind', 'tick', '--since', '1h', '--limit', '1', '--json')
      expect(ticks.code, ticks.output).toBe(0)
      expect(jsonLines(ticks.output)[0]).toMatchObject({
        subject: 'fleet.events._system.tick',
        ok: true,
        event: { type: 'clock.ticked' },
      })
    })

    it('follows new events live until Ctrl-C, exits 0 and leaves no consumer behind', async () => {
      const tail = spawnCli(
        ['events', 'tail', '--device', 'dev-live', '--last', '0', '--verbose'],
        env,
      )
      await waitFor('the tail to start', () => tail.output().includes('(Ctrl-C to stop)'))
      const published = await testPublisher(rt).publish(readingDraft('dev-live', 7))
      await waitFor('the live event', () =>
        tail.output().includes(`eventId:     ${published.event.eventId}`),
      )
      tail.child.kill('SIGINT')
      expect(await tail.exited).toBe(0)
      expect(tail.output()).toContain(`seq:         ${published.seq} (stored`)
      const consumers = (await rt.jsm.consumers.list(EVENTS).next()).map((c) => c.name)
      expect(consumers.sort()).toEqual([...PROCESSOR_NAMES].sort())
    })

    it('refuses bad options naming the option, the rule and the value (exit 2)', async () => {
      const cases: [string[], string][] = [
        [
          ['--since', 'yesterday'],
          "option '--since <time>' argument 'yesterday' is invalid. must be an ISO 8601 time with a zone",
        ],
        [['--since', '2026-11-23T10:00:00'], "got '2026-11-23T10:00:00'"],
        [
          ['--from-seq', 'x'],
          "option '--from-seq <n>' argument 'x' is invalid. must be an integer >= 1, got 'x'",
        ],
        [
          ['--limit', '0'],
          "option '--limit <n>' argument '0' is invalid. must be an integer >= 1, got '0'",
        ],
        [
          ['--kind', 'bogus'],
          "option '--kind <kind>' argument 'bogus' is invalid. Allowed choices are registered, reading",
        ],
        [
          ['--device', 'Sensor 7'],
          "must match /^[a-z0-9-]{1,64}$/ (or be '_system'), got 'Sensor 7'",
        ],
        [
          ['--from-seq', '3', '--since', '1h'],
          "option '--from-seq <n>' cannot be used with option '--since <time>'",
        ],
      ]
      for (const [args, message] of cases) {
        const r = await cli('tail', ...args)
        expect(r.code, `${args.join(' ')}: ${r.output}`).toBe(2)
        expect(r.output).toContain(message)
      }
    })
  })

  describe('README: Inspect with the nats CLI', () => {
    it('names streams, consumers and headers that exist, on the messages they are said to be on', async () => {
      const doc = await natsSection()
      const streams = new Set(
        doc.commands.flatMap((c) => c.argv.filter((a) => /^FLEET_[A-Z]+$/.test(a))),
      )
      expect([...streams].sort()).toEqual(
        [rt.config.streams.events, rt.config.streams.dlq, rt.config.streams.notifications].sort(),
      )
      for (const [stream, names] of doc.headers) {
        const seen = new Set<string>()
        for (const m of await readAll(stream)) for (const k of m.headers?.keys() ?? []) seen.add(k)
        for (const name of names) expect(seen, `${stream} header ${name}`).toContain(name)
      }
      expect([...doc.headers.keys()].sort()).toEqual([...streams].sort())
    })

    it('every read-only command works as documented, and leaves the processors as they were', async () => {
      const doc = await natsSection()
      await allCaughtUp(rt, PROCESSOR_NAMES)
      const before = await durableStates()
      const results = []
      for (const c of doc.commands.filter((c) => c.block === 0))
        results.push(await perform(c.argv, {}))
      expect(await durableStates()).toEqual(before)
      expect(results.length).toBeGreaterThanOrEqual(10)
      const durables = doc.commands
        .filter((c) => c.argv[1] === 'consumer' && c.argv[2] === 'info')
        .map((c) => c.argv[4])
      expect(durables.sort()).toEqual([...PROCESSOR_NAMES].sort())
    })

    it('reads what a processor gets next without taking it from the processor', async () => {
      const doc = await natsSection()
      const peek = doc.commands.filter((c) => c.block === 1)
      // The README's unsafe example stays a warning: no command pulls from a processor's consumer.
      for (const c of doc.commands) {
        if (c.argv[1] === 'consumer' && c.argv[2] === 'next')
          expect(PROCESSOR_NAMES as readonly string[]).not.toContain(c.argv[4])
      }
      await allCaughtUp(rt, PROCESSOR_NAMES)
      const readings = running.find((p) => p.name === 'readings')!
      await readings.stop()
      running = running.filter((p) => p !== readings)
      const publisher = testPublisher(rt, 'gw-2')
      const fresh: PublishResult[] = []
      for (const v of [30, 31, 32]) fresh.push(await publisher.publish(readingDraft('dev-c', v)))
      await allCaughtUp(rt, ['sensor-status', 'alerts'])
      await waitFor(
        'readings to have 3 pending',
        async () => (await rt.jsm.consumers.info(EVENTS, 'readings')).num_pending === 3,
      )

      const before = await durableStates()
      const vars: Record<string, number> = {}
      const outputs: JsMsg[][] = []
      for (const c of peek) {
        const out = await perform(c.argv, vars)
        if (Array.isArray(out)) outputs.push(out as JsMsg[])
      }
      expect(await durableStates()).toEqual(before)
      // `nats sub --start-sequence "$next"` and `nats consumer next` on the peek consumer both
      // saw exactly what the stopped processor has yet to apply.
      const ids = fresh.map((p) => p.event.eventId)
      expect(outputs).toHaveLength(2)
      for (const out of outputs) expect(out.map((m) => m.headers?.get('Nats-Msg-Id'))).toEqual(ids)

      running.push(startProcessor(rt.processors.readings, rt))
      await allCaughtUp(rt, PROCESSOR_NAMES)
      const applied = await rt.db
        .selectFrom('readings')
        .select('event_id')
        .where('event_id', 'in', ids)
        .execute()
      expect(applied).toHaveLength(3)
      const consumers = (await rt.jsm.consumers.list(EVENTS).next()).map((c) => c.name)
      expect(consumers.sort()).toEqual([...PROCESSOR_NAMES].sort())
    })
  })

  /** What `nats consumer info` shows of the processors' consumers that a reader could change. */
  async function durableStates() {
    return Promise.all(
      PROCESSOR_NAMES.map(async (n) => {
        const ci = await rt.jsm.consumers.info(EVENTS, n)
        return {
          name: ci.name,
          delivered: ci.delivered.stream_seq,
          deliveredConsumerSeq: ci.delivered.consumer_seq,
          ackFloor: ci.ack_floor.stream_seq,
          pending: ci.num_pending,
          ackPending: ci.num_ack_pending,
          redelivered: ci.num_redelivered,
        }
      }),
    )
  }

  /** Every message of a stream, through an ordered consumer (deleted afterwards). */
  async function readAll(
    stream: string,
    opts: Partial<OrderedConsumerOptions> = {},
  ): Promise<JsMsg[]> {
    const consumer = await rt.js.consumers.get(stream, {
      deliver_policy: DeliverPolicy.All,
      ...opts,
    })
    const out: JsMsg[] = []
    try {
      let pending = (await consumer.info(true)).num_pending
      while (pending > 0) {
        const m = await consumer.next({ expires: 5000 })
        if (m === null) throw new Error(`${stream}: ${pending} messages pending but none delivered`)
        out.push(m)
        pending = m.info.pending
      }
    } finally {
      await consumer.delete().catch(() => false)
    }
    return out
  }

  /** Does through the JetStream API what `nats <argv>` does; returns what it shows. */
  async function perform(argv: readonly string[], vars: Record<string, number>): Promise<unknown> {
    const assigned = /^(\w+)=$/.exec(argv[0] ?? '')
    if (assigned) {
      // name=$(( $(nats ... --json | jq .path) + 1 ))
      const shown = await perform(argv.slice(1, -1), vars)
      const value = jqPath(shown, argv[argv.length - 1]!)
      expect(typeof value, argv.join(' ')).toBe('number')
      vars[assigned[1]!] = (value as number) + 1
      return vars[assigned[1]!]
    }
    expect(argv[0]).toBe('nats')
    const { pos, flags } = parseArgs(argv.slice(1), vars)
    const what = pos[0] === 'sub' ? 'sub' : `${pos[0]} ${pos[1]}`
    const stream = pos[2]!
    switch (what) {
      case 'stream info': {
        const info = await rt.jsm.streams.info(stream)
        expect(info.config.name).toBe(stream)
        if (stream === EVENTS)
          expect(info.config).toMatchObject({ deny_delete: true, deny_purge: true })
        return info
      }
      case 'stream get': {
        const m = await rt.jsm.streams.getMessage(stream, { seq: Number(pos[3]) })
        expect(m, argv.join(' ')).not.toBeNull()
        if (stream === EVENTS) {
          const shown = JSON.parse((await cli('show', pos[3]!, '--json')).output) as ShownEvent
          expect(shown).toMatchObject({
            seq: m!.seq,
            subject: m!.subject,
            storedAt: m!.time.toISOString(),
          })
        }
        return m
      }
      case 'stream view': {
        const filter = str(flags.subject)
        const start: Partial<OrderedConsumerOptions> =
          flags.id !== undefined
            ? { deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: Number(flags.id) }
            : flags.since !== undefined
              ? {
                  opt_start_time: new Date(
                    Date.now() - durationMs(str(flags.since)!),
                  ).toISOString(),
                }
              : {}
        const msgs = await readAll(stream, {
          ...(filter ? { filter_subjects: filter } : {}),
          ...start,
        })
        expect(msgs.length, argv.join(' ')).toBeGreaterThan(0)
        for (const m of msgs) {
          if (filter) expect(subjectMatches(filter, m.subject), m.subject).toBe(true)
          if (flags.id !== undefined) expect(m.seq).toBeGreaterThanOrEqual(Number(flags.id))
        }
        return msgs
      }
      case 'consumer info': {
        const ci: ConsumerInfo = await rt.jsm.consumers.info(stream, pos[3]!)
        expect(ci.config).toMatchObject({ durable_name: pos[3], ack_policy: AckPolicy.All })
        return ci
      }
      case 'consumer report': {
        const all = await rt.jsm.consumers.list(stream).next()
        expect(all.map((c) => c.name).sort()).toEqual([...PROCESSOR_NAMES].sort())
        return all
      }
      case 'sub': {
        // `nats sub --stream S <subject>`: an ephemeral consumer that acks nothing
        const s = str(flags.stream)!
        const subject = pos[1]!
        const count = flags.count !== undefined ? Number(flags.count) : undefined
        const ci = await rt.jsm.consumers.add(s, {
          ack_policy: AckPolicy.None,
          filter_subject: subject,
          inactive_threshold: nanos(30_000),
          mem_storage: true,
          ...(flags['start-sequence'] !== undefined
            ? {
                deliver_policy: DeliverPolicy.StartSequence,
                opt_start_seq: Number(flags['start-sequence']),
              }
            : flags.last
              ? { deliver_policy: DeliverPolicy.Last }
              : flags.new
                ? { deliver_policy: DeliverPolicy.New }
                : { deliver_policy: DeliverPolicy.All }),
        })
        try {
          const msgs = await fetchAll(s, ci, count ?? ci.num_pending)
          expect(msgs.length, argv.join(' ')).toBeGreaterThan(0)
          if (flags.last) expect(msgs).toHaveLength(1)
          if (count !== undefined) expect(msgs.length).toBeLessThanOrEqual(count)
          for (const m of msgs) expect(subjectMatches(subject, m.subject), m.subject).toBe(true)
          return msgs
        } finally {
          await rt.jsm.consumers.delete(s, ci.name)
        }
      }
      case 'consumer add': {
        // Only a consumer of one's own, that acks nothing, is documented.
        expect(flags).toMatchObject({ ephemeral: true, pull: true, ack: 'none' })
        return rt.jsm.consumers.add(stream, {
          name: pos[3]!,
          ack_policy: AckPolicy.None,
          filter_subject: str(flags.filter)!,
          deliver_policy: DeliverPolicy.StartSequence,
          opt_start_seq: Number(flags.deliver),
          inactive_threshold: nanos(durationMs(str(flags['inactive-threshold'])!)),
        })
      }
      case 'consumer next': {
        expect(PROCESSOR_NAMES as readonly string[]).not.toContain(pos[3])
        const ci = await rt.jsm.consumers.info(stream, pos[3]!)
        return fetchAll(stream, ci, Number(flags.count ?? 1), flags['no-ack'] !== true)
      }
      case 'consumer rm':
        return rt.jsm.consumers.delete(stream, pos[3]!)
      default:
        throw new Error(
          `the README documents 'nats ${argv.slice(1).join(' ')}', which this test does not perform`,
        )
    }
  }

  async function fetchAll(
    stream: string,
    ci: ConsumerInfo,
    count: number,
    ack = false,
  ): Promise<JsMsg[]> {
    expect(ci.stream_name).toBe(stream)
    const consumer = rt.js.consumers.getConsumerFromInfo(ci)
    const out: JsMsg[] = []
    while (out.length < count) {
      const m = await consumer.next({ expires: 2000 })
      if (m === null) break
      if (ack) m.ack()
      out.push(m)
    }
    return out
  }
})

interface DocCommand {
  /** Which ```sh block of the section (0: read-only, 1: reading what a processor gets next). */
  readonly block: number
  readonly argv: readonly string[]
}

/** The section's commands, and the headers it says each stream's messages carry. */
async function natsSection(): Promise<{ commands: DocCommand[]; headers: Map<string, string[]> }> {
  const readme = await readFile(join(repoRoot, 'README.md'), 'utf8')
  const section = readme.split('\n## Inspect with the nats CLI\n')[1]?.split('\n## ')[0] ?? ''
  const blocks = [...section.matchAll(/```sh\n([\s\S]*?)```/g)].map((m) => m[1]!)
  expect(blocks).toHaveLength(2)
  const commands = blocks.flatMap((text, block) =>
    text
      .split('\n')
      .map(shellWords)
      .filter((argv) => argv.length > 0)
      .map((argv) => ({ block, argv })),
  )
  const headers = new Map<string, string[]>()
  for (const m of section.matchAll(/^- \*\*(FLEET_[A-Z]+)\*\*([\s\S]*?)(?=\n- \*\*|\n\n)/gm)) {
    const names = [...m[2]!.matchAll(/`([^`]+)`/g)]
      .map((c) => c[1]!)
      .filter((c) => /^(Nats-[A-Za-z-]+|Fleet-[A-Za-z-]+|traceparent)$/.test(c))
    headers.set(m[1]!, names)
  }
  return { commands, headers }
}

/**
 * A README shell line as argv: quotes removed, `# comments` dropped. The one assignment the
 * section uses, `next=$(( $(nats consumer info S C --json | jq .ack_floor.stream_seq) + 1 ))`,
 * becomes `['next=', ...that consumer info argv, '.ack_floor.stream_seq']`.
 */
function shellWords(line: string): string[] {
  const assignment = /^(\w+)=\$\(\( \$\((nats [^|]+?) \| jq (\S+)\) \+ 1 \)\)$/.exec(line.trim())
  if (assignment) return [`${assignment[1]}=`, ...shellWords(assignment[2]!), assignment[3]!]
  const out: string[] = []
  let word: string | undefined
  let quote: string | undefined
  for (const ch of line) {
    if (quote !== undefined) {
      if (ch === quote) quote = undefined
      else word = (word ?? '') + ch
    } else if (ch === "'" || ch === '"') {
      quote = ch
      word ??= ''
    } else if (/\s/.test(ch)) {
      if (word !== undefined) out.push(word)
      word = undefined
    } else if (ch === '#' && word === undefined) {
      break
    } else {
      word = (word ?? '') + ch
    }
  }
  if (word !== undefined) out.push(word)
  return out
}

/** Positional arguments and `--flag [value]` pairs; `$var` replaced from `vars`. */
function parseArgs(
  argv: readonly string[],
  vars: Record<string, number>,
): { pos: string[]; flags: Record<string, string | true> } {
  const boolean = new Set([
    'last',
    'all',
    'new',
    'ephemeral',
    'pull',
    'defaults',
    'no-ack',
    'json',
    'f',
  ])
  const pos: string[] = []
  const flags: Record<string, string | true> = {}
  const value = (v: string) => (v.startsWith('$') ? String(vars[v.slice(1)] ?? `(unset ${v})`) : v)
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!
    if (a.startsWith('-')) {
      const name = a.replace(/^--?/, '')
      if (boolean.has(name)) flags[name] = true
      else flags[name] = value(argv[++i] ?? '')
    } else pos.push(value(a))
  }
  return { pos, flags }
}

/** `jq .a.b` on a JSON value. */
function jqPath(value: unknown, path: string): unknown {
  return path
    .split('.')
    .filter((k) => k !== '')
    .reduce<unknown>((v, k) => (v as Record<string, unknown> | undefined)?.[k], value)
}

function str(v: string | true | undefined): string | undefined {
  return typeof v === 'string' ? v : undefined
}

/** Go-style durations as natscli takes them: `10m`, `1h`, `90s`. */
function durationMs(d: string): number {
  const m = /^(\d+)(s|m|h)$/.exec(d)
  if (m === null) throw new Error(`unsupported duration '${d}'`)
  return Number(m[1]) * { s: 1000, m: 60_000, h: 3_600_000 }[m[2] as 's' | 'm' | 'h']
}
