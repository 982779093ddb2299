import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { acknowledgeAlert } from '../cli/commands/alerts-command.ts'
import type { Runtime } from '../app/runtime.ts'
import { createPublisher, PublishPipeline, type Publisher } from '../infra/publisher.ts'
import { PROCESSOR_NAMES } from '../processors/processor-registry.ts'
import { resetProjection } from '../processors/admin/reset.ts'
import type { FleetEvent } from '../schemas/events.ts'
import { HybridLogicalClock } from '../schemas/hlc.ts'
import { simulateFleet } from '../simulator/fleet.ts'
import {
  FAST_FORWARD_TICKS,
  allCaughtUp,
  dumpReadModels,
  pastDedupWindow,
  pipeline,
  testConfig,
  testPublisher,
  tickDraft,
  waitFor,
  type Pipeline,
} from './fixtures.ts'

/** Publishes events as they are (ids and HLCs kept), a window at a time. */
async function publishAll(publisher: Publisher, events: readonly FleetEvent[]): Promise<void> {
  const pipe = new PublishPipeline(128)
  for (const e of events) await pipe.submit(() => publisher.publishEvent(e))
  await pipe.drain()
}

describe('guarantees of all three read models', () => {
  let p: Pipeline
  const sent: FleetEvent[] = []
  beforeAll(async () => {
    p = await pipeline(FAST_FORWARD_TICKS)
    p.start()
    // A busy fleet: registrations, readings with heat episodes, heartbeats, duplicates...
    const publisher = testPublisher(p.rt, 'sim')
    await simulateFleet(publisher, {
      devices: 40,
      rate: 1500,
      durationSeconds: 3,
      duplicateRatio: 0.05,
      seed: 7,
    })
    // ...status changes, a decommissioning, clock ticks that silence part of the fleet, an ack.
    const ops = testPublisher(p.rt, 'ops')
    await ops.publish({
      type: 'status.changed',
      deviceId: 'sensor-00003',
      data: { status: 'maintenance' },
    })
    await ops.publish({
      type: 'status.changed',
      deviceId: 'sensor-00004',
      data: { status: 'decommissioned' },
    })
    for (let i = 0; i < 3; i++) {
      await ops.publish({
        type: 'reading.recorded',
        deviceId: 'hot-1',
        data: { metric: 'temperature', value: 50 + i, unit: 'C' },
      })
    }
    await ops.publish(tickDraft(Date.now() + 10_000))
    // sensor-00001 is allowed an hour of silence; the rest is silent after the 30 s default.
    await ops.publish({
      type: 'sensor.registered',
      deviceId: 'sensor-00001',
      data: {
        site: 'site-001',
        model: 'fs-th-200',
        firmware: '1.5.0',
        inactivityTimeoutSeconds: 3600,
      },
    })
    await ops.publish(tickDraft(Date.now() + 40_000))
    await allCaughtUp(p.rt, PROCESSOR_NAMES)
    const open = await p.rt.db
      .selectFrom('alerts')
      .select('alert_id')
      .where('state', '=', 'open')
      .where('device_id', '=', 'hot-1')
      .where('rule_id', '=', 'temperature-high')
      .execute()
    await acknowledgeAlert(
      p.rt,
      new HybridLogicalClock({ node: 'ops', maxOffsetMs: 500 }),
      open[0]!.alert_id,
      'jo',
    )
    await allCaughtUp(p.rt, PROCESSOR_NAMES)

    const info = await p.rt.jsm.streams.info(p.rt.config.streams.events)
    for (let seq = 1; seq <= info.state.last_seq; seq++) {
      const m = await p.rt.jsm.streams.getMessage(p.rt.config.streams.events, { seq })
      sent.push(m!.json<FleetEvent>())
    }
  }, 120_000)
  afterAll(async () => p.close())

  it('the run exercised every read model', async () => {
    const count = async (t: string) =>
      Number((await p.rt.pool.query<{ n: string }>(`select count(*) as n from ${t}`)).rows[0]!.n)
    // As many as were published (how many depends on the machine's speed, not asserted).
    const readingIds = new Set(
      sent.filter((e) => e.type === 'reading.recorded').map((e) => e.eventId),
    )
    expect(readingIds.size).toBeGreaterThan(100)
    expect(await count('readings')).toBe(readingIds.size)
    // a registration for each of the 41 sensors, and most of them going silent
    expect(await count('sensor_status_history')).toBeGreaterThan(41 + 30)
    const states = await p.rt.pool.query<{ status: string }>(
      'select distinct status from sensor_status',
    )
    expect(states.rows.map((r) => r.status).sort()).toEqual([
      'active',
      'decommissioned',
      'maintenance',
      'unknown',
    ])
    const alerts = await p.rt.pool.query<{ rule_id: string; state: string }>(
      'select distinct rule_id, state from alerts',
    )
    expect(alerts.rows).toEqual(
      expect.arrayContaining([
        { rule_id: 'temperature-high', state: 'acknowledged' },
        { rule_id: 'sensor-silent', state: 'open' },
      ]),
    )
  })

  it('stores correlation and causation ids with the rows they produced', async () => {
    const ack = sent.find((e) => e.type === 'alert.acknowledged')!
    const alert = await p.rt.db
      .selectFrom('alerts')
      .selectAll()
      .where('acknowledged_event_id', '=', ack.eventId)
      .executeTakeFirstOrThrow()
    expect(ack.correlationId).toBe(alert.correlation_id)
    expect(ack.causationId).toBe(alert.raised_event_id)
    const reading = sent.find((e) => e.type === 'reading.recorded')!
    const row = await p.rt.db
      .selectFrom('readings')
      .selectAll()
      .where('event_id', '=', reading.eventId)
      .executeTakeFirstOrThrow()
    expect(row.correlation_id).toBe(reading.correlationId)
    const h = await p.rt.db
      .selectFrom('sensor_status_history')
      .selectAll()
      .where('event_id', '=', sent[0]!.eventId)
      .executeTakeFirstOrThrow()
    expect(h.correlation_id).toBe(sent[0]!.correlationId)
  })

  it('exactly-once effect: every event re-published under a new stream sequence changes nothing in any table', async () => {
    const before = await dumpReadModels(p.rt)
    await pastDedupWindow() // the stream stores them again, under new sequences
    const publisher = createPublisher(p.rt.js, {
      clock: new HybridLogicalClock({ node: 'replayer', maxOffsetMs: 500 }),
    })
    // The stream may hold an event twice (a device re-send after the window): each distinct event
    // is sent once more, so every one is stored again, whatever the time publishing takes.
    const distinct = [...new Map(sent.map((e) => [e.eventId, e])).values()]
    await publishAll(publisher, distinct)
    expect(publisher.stats.published).toBe(distinct.length)
    await allCaughtUp(p.rt, PROCESSOR_NAMES)
    expect(await dumpReadModels(p.rt)).toEqual(before)
  })

  it('replay-identical: dropped and rebuilt from sequence 1 in other batch sizes, every table is the same row by row', async () => {
    await waitFor('the outbox to drain', async () => {
      const r = await p.rt.pool.query(
        'select 1 from notification_outbox where published_at is null',
      )
      return r.rowCount === 0
    })
    const live = await dumpReadModels(p.rt)
    const notificationsBefore = (await p.rt.jsm.streams.info(p.rt.config.streams.notifications))
      .state.messages
    await p.stop()
    for (const n of PROCESSOR_NAMES)
      await resetProjection(p.rt.db, n, p.rt.processors[n].projection)
    expect((await dumpReadModels(p.rt)).readings).toEqual([])

    p.start(
      testConfig(p.nats.url, p.rt.config.databaseUrl, {
        ...FAST_FORWARD_TICKS,
        ALERT_RULES_FILE: p.rt.config.alertRulesFile!,
        SENSOR_INACTIVITY_TIMEOUT_SECONDS: '30',
        PROCESSOR_BATCH_SIZE: '37',
      }),
    )
    await allCaughtUp(p.rt, PROCESSOR_NAMES, 120_000)
    await waitFor('the outbox to drain', async () => {
      const r = await p.rt.pool.query(
        'select 1 from notification_outbox where published_at is null',
      )
      return r.rowCount === 0
    })
    const rebuilt = await dumpReadModels(p.rt)
    for (const t of Object.keys(live)) expect(rebuilt[t], t).toEqual(live[t])
    // and the rebuild's notifications were recognised as sent: none went out twice
    expect((await p.rt.jsm.streams.info(p.rt.config.streams.notifications)).state.messages).toBe(
      notificationsBefore,
    )
  })
})

describe('shuffled, duplicated input with skewed clocks', () => {
  let ordered: Pipeline
  let shuffled: Pipeline
  beforeAll(async () => {
    ordered = await pipeline(FAST_FORWARD_TICKS)
    shuffled = await pipeline(FAST_FORWARD_TICKS)
  })
  afterAll(async () => {
    await ordered.close()
    await shuffled.close()
  })

  it('ends in the same statuses and latest values as the ordered input', async () => {
    // Three gateways whose clocks disagree by up to 400 ms (within the 500 ms max offset).
    const gateways = [-400, 0, 250].map((skew, i) =>
      createPublisher(ordered.rt.js, {
        clock: new HybridLogicalClock({
          node: `gw-${i}`,
          maxOffsetMs: 500,
          physicalNow: () => Date.now() + skew,
        }),
      }),
    )
    let seed = 11
    const rnd = () => (seed = (seed * 16807) % 2147483647) / 2147483647
    const events: FleetEvent[] = []
    const start = Date.now()
    for (let step = 0; step < 1500; step++) {
      const gw = gateways[step % 3]!
      const device = `dev-${Math.floor(rnd() * 25)}`
      const roll = rnd()
      const statuses = ['active', 'inactive', 'maintenance', 'decommissioned'] as const
      if (roll < 0.05)
        events.push(
          gw.stamp({
            type: 'sensor.registered',
            deviceId: device,
            data: { site: `s-${step % 3}`, model: 'm', firmware: `${step}` },
          }),
        )
      else if (roll < 0.12)
        events.push(
          gw.stamp({
            type: 'status.changed',
            deviceId: device,
            data: { status: statuses[Math.floor(rnd() * 4)]! },
          }),
        )
      else if (roll < 0.2)
        events.push(
          gw.stamp({
            type: 'heartbeat.received',
            deviceId: device,
            data: { batteryPercent: Math.round(rnd() * 100) },
          }),
        )
      else
        events.push(
          gw.stamp({
            type: 'reading.recorded',
            deviceId: device,
            data: {
              metric: rnd() < 0.5 ? 'temperature' : 'humidity',
              value: Math.round(rnd() * 600) / 10,
              unit: 'C',
            },
          }),
        )
      if (step === 700) {
        await new Promise((r) => setTimeout(r, 40))
        events.push(gateways[1]!.stamp(tickDraft(Date.now() + 29_000)))
      }
    }
    events.push(gateways[1]!.stamp(tickDraft(start + 45_000)))

    const byHlc = [...events].sort((a, b) => (a.hlc < b.hlc ? -1 : 1))
    const mixed = [...events]
      .map((e) => ({ e, k: rnd() }))
      .sort((a, b) => a.k - b.k)
      .map((x) => x.e)
    const again = mixed.filter(() => rnd() < 0.2)

    ordered.start()
    shuffled.start()
    await publishAll(testPublisher(ordered.rt), byHlc)
    const into = testPublisher(shuffled.rt)
    await publishAll(into, mixed)
    await pastDedupWindow() // so that these duplicates reach the processors
    await publishAll(into, again)
    await allCaughtUp(ordered.rt, PROCESSOR_NAMES)
    await allCaughtUp(shuffled.rt, PROCESSOR_NAMES)

    const status = (rt: Runtime) =>
      rt.db
        .selectFrom('sensor_status')
        .select([
          'device_id',
          'status',
          'last_seen_hlc',
          'last_seen_at',
          'site',
          'firmware',
          'registered_hlc',
          'decommissioned_hlc',
          'declared_status',
          'declared_hlc',
        ])
        .orderBy('device_id')
        .execute()
    const latest = (rt: Runtime) =>
      rt.db
        .selectFrom('latest_readings')
        .select(['device_id', 'metric', 'value', 'hlc', 'event_id', 'occurred_at'])
        .orderBy('device_id')
        .orderBy('metric')
        .execute()
    const a = await status(ordered.rt)
    expect(a.length).toBe(25)
    expect(new Set(a.map((s) => s.status)).size).toBeGreaterThan(2)
    expect(await status(shuffled.rt)).toEqual(a)
    expect(await latest(shuffled.rt)).toEqual(await latest(ordered.rt))
    expect((await ordered.rt.db.selectFrom('readings').select('event_id').execute()).length).toBe(
      (await shuffled.rt.db.selectFrom('readings').select('event_id').execute()).length,
    )
  })
})
