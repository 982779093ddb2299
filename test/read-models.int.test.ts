import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { acknowledgeAlert } from '../cli/commands/alerts-command.ts'
import type { Runtime } from '../app/runtime.ts'
import { PROCESSOR_NAMES } from '../processors/processor-registry.ts'
import { HybridLogicalClock } from '../schemas/hlc.ts'
import type { NatsServer } from './harness/test-servers.ts'
import {
  allCaughtUp,
  pastDedupWindow,
  pipeline,
  runCli,
  testEnv,
  testPublisher,
  tickDraft,
  waitFor,
  type Pipeline,
} from './fixtures.ts'

describe('the three read models', () => {
  let p: Pipeline
  let nats: NatsServer
  let rt: Runtime
  beforeAll(async () => {
    p = await pipeline()
    p.start()
    ;({ nats, rt } = p)
  })
  afterAll(async () => p.close())
  const caughtUp = () => allCaughtUp(rt, PROCESSOR_NAMES)
  const sensor = (id: string) =>
    rt.db
      .selectFrom('sensor_status')
      .selectAll()
      .where('device_id', '=', id)
      .executeTakeFirstOrThrow()
  const history = async (id: string) =>
    (
      await rt.db
        .selectFrom('sensor_status_history')
        .selectAll()
        .where('device_id', '=', id)
        .orderBy('hlc')
        .execute()
    ).map((h) => [h.from_status, h.to_status, h.reason])

  describe('sensor-status', () => {
    it('given a registration, the sensor is active with its site and firmware, and the transition is in its history', async () => {
      const publisher = testPublisher(rt)
      const { event } = await publisher.publish({
        type: 'sensor.registered',
        deviceId: 'st-1',
        data: { site: 'plant-a', model: 'th-200', firmware: '1.4.2' },
      })
      await caughtUp()
      expect(await sensor('st-1')).toMatchObject({
        status: 'active',
        site: 'plant-a',
        firmware: '1.4.2',
        status_event_id: event.eventId,
        status_correlation_id: event.correlationId,
        last_seen_hlc: event.hlc,
      })
      expect(await history('st-1')).toEqual([[null, 'active', 'registered']])
    })

    it('explicit status is last-writer-wins by HLC: an older change arriving later does not change the status, and takes its place in the history', async () => {
      const publisher = testPublisher(rt)
      await publisher.publish({
        type: 'sensor.registered',
        deviceId: 'st-2',
        data: { site: 'plant-a', model: 'm', firmware: '1' },
      })
      const older = publisher.stamp({
        type: 'status.changed',
        deviceId: 'st-2',
        data: { status: 'inactive' },
      })
      const newer = publisher.stamp({
        type: 'status.changed',
        deviceId: 'st-2',
        data: { status: 'maintenance', reason: 'calibration' },
      })
      await publisher.publishEvent(newer)
      await publisher.publishEvent(older)
      await caughtUp()
      expect(await sensor('st-2')).toMatchObject({
        status: 'maintenance',
        status_event_id: newer.eventId,
      })
      // the history is the same as had they arrived in HLC order
      expect(await history('st-2')).toEqual([
        [null, 'active', 'registered'],
        ['active', 'inactive', 'status changed to inactive'],
        ['inactive', 'maintenance', 'status changed to maintenance: calibration'],
      ])
    })

    it('a decommissioned sensor stays decommissioned until it is registered again', async () => {
      const publisher = testPublisher(rt)
      const reg = {
        type: 'sensor.registered',
        deviceId: 'st-3',
        data: { site: 'plant-b', model: 'm', firmware: '1' },
      } as const
      await publisher.publish(reg)
      await publisher.publish({
        type: 'status.changed',
        deviceId: 'st-3',
        data: { status: 'decommissioned' },
      })
      await publisher.publish({
        type: 'status.changed',
        deviceId: 'st-3',
        data: { status: 'active' },
      })
      await publisher.publish({
        type: 'reading.recorded',
        deviceId: 'st-3',
        data: { metric: 'temperature', value: 20, unit: 'C' },
      })
      await caughtUp()
      expect((await sensor('st-3')).status).toBe('decommissioned')
      await publisher.publish({ ...reg, data: { ...reg.data, firmware: '2' } })
      await caughtUp()
      expect(await sensor('st-3')).toMatchObject({ status: 'active', firmware: '2' })
      expect(await history('st-3')).toEqual([
        [null, 'active', 'registered'],
        ['active', 'decommissioned', 'status changed to decommissioned'],
        ['decommissioned', 'active', 're-registered'],
      ])
    })

    it('a silent sensor becomes unknown when a clock tick says its timeout passed, and active when heard again', async () => {
      const publisher = testPublisher(rt)
      const reg = await publisher.publish({
        type: 'sensor.registered',
        deviceId: 'st-4',
        data: { site: 'plant-b', model: 'm', firmware: '1', inactivityTimeoutSeconds: 1 },
      })
      const seen = Date.parse(reg.event.occurredAt)
      await publisher.publish(tickDraft(seen + 500))
      await caughtUp()
      expect((await sensor('st-4')).status).toBe('active')
      await new Promise((r) => setTimeout(r, 1100))
      const tick = await publisher.publish(tickDraft(Date.now()))
      await caughtUp()
      expect(await sensor('st-4')).toMatchObject({
        status: 'unknown',
        status_event_id: tick.event.eventId,
      })
      await publisher.publish({
        type: 'heartbeat.received',
        deviceId: 'st-4',
        data: { batteryPercent: 80 },
      })
      await caughtUp()
      expect((await sensor('st-4')).status).toBe('active')
      expect(await history('st-4')).toEqual([
        [null, 'active', 'registered'],
        ['active', 'unknown', 'silent'],
        ['unknown', 'active', 'seen again'],
      ])
    })
  })

  describe('readings', () => {
    it('rolls readings up per minute, counting each reading once even when re-published later', async () => {
      const publisher = testPublisher(rt)
      const minute = '2026-11-23T10:15'
      const sent = []
      for (const [i, value] of [1, 2, 3].entries()) {
        const r = await publisher.publish({
          type: 'reading.recorded',
          deviceId: 'rd-1',
          occurredAt: `${minute}:0${i}.000Z`,
          data: { metric: 'temperature', value, unit: 'C' },
        })
        sent.push(r.event)
      }
      await caughtUp()
      await pastDedupWindow()
      const again = await publisher.publishEvent(sent[1]!)
      expect(again.duplicate).toBe(false)
      await caughtUp()
      const rollup = await rt.db
        .selectFrom('readings_per_minute')
        .selectAll()
        .where('device_id', '=', 'rd-1')
        .execute()
      expect(rollup).toEqual([
        {
          device_id: 'rd-1',
          metric: 'temperature',
          minute: new Date(`${minute}:00.000Z`),
          count: 3,
          min: 1,
          max: 3,
          sum: 6,
        },
      ])
    })
  })

  describe('alerts', () => {
    const alert = (device: string, rule: string) =>
      rt.db
        .selectFrom('alerts')
        .selectAll()
        .where('device_id', '=', device)
        .where('rule_id', '=', rule)
        .orderBy('raised_hlc')
        .execute()

    it('raises after the run, is acknowledged by an operator event, resolves below the clear level, and notifies once each', async () => {
      const publisher = testPublisher(rt)
      const read = (value: number) =>
        publisher.publish({
          type: 'reading.recorded',
          deviceId: 'al-1',
          data: { metric: 'temperature', value, unit: 'C' },
        })
      await read(41)
      const second = await read(43)
      await read(44)
      await caughtUp()
      let [a] = await alert('al-1', 'temperature-high')
      expect(a).toMatchObject({
        state: 'open',
        severity: 'critical',
        raised_event_id: second.event.eventId,
        correlation_id: second.event.correlationId,
        value: 43,
        occurrences: 2,
      })

      const clock = new HybridLogicalClock({ node: 'ops', maxOffsetMs: 500 })
      const ack = await acknowledgeAlert(rt, clock, a!.alert_id, 'jo', 'on it')
      await caughtUp()
      ;[a] = await alert('al-1', 'temperature-high')
      expect(a).toMatchObject({
        state: 'acknowledged',
        acknowledged_by: 'jo',
        acknowledged_event_id: ack.eventId,
      })
      const ackEvent = await rt.jsm.streams.getMessage(rt.config.streams.events, { seq: ack.seq })
      expect(ackEvent?.json()).toMatchObject({
        causationId: second.event.eventId,
        correlationId: second.event.correlationId,
      })

      await read(37) // between clear and raise: hysteresis keeps it
      await caughtUp()
      expect((await alert('al-1', 'temperature-high'))[0]?.state).toBe('acknowledged')
      const clear = await read(35)
      await caughtUp()
      expect((await alert('al-1', 'temperature-high'))[0]).toMatchObject({
        state: 'resolved',
        resolved_event_id: clear.event.eventId,
      })

      const subjects = async () => {
        await waitFor('the outbox to drain', async () => {
          const r = await rt.db
            .selectFrom('notification_outbox')
            .select('notification_id')
            .where('published_at', 'is', null)
            .execute()
          return r.length === 0
        })
        const info = await rt.jsm.streams.info(rt.config.streams.notifications)
        const out: string[] = []
        for (
          let seq = info.state.first_seq;
          seq <= info.state.last_seq && info.state.messages > 0;
          seq++
        ) {
          const m = await rt.jsm.streams.getMessage(rt.config.streams.notifications, { seq })
          if (m && m.subject.includes('.al-1.')) out.push(m.subject)
        }
        return out
      }
      const id = a!.alert_id
      expect(await subjects()).toEqual([
        `fleet.notifications.alerts.critical.al-1.${id}-raised`,
        `fleet.notifications.alerts.critical.al-1.${id}-resolved`,
      ])
      // A replay of the outbox (rows marked unsent again) sends nothing twice.
      await rt.db.updateTable('notification_outbox').set({ published_at: null }).execute()
      expect(await subjects()).toEqual([
        `fleet.notifications.alerts.critical.al-1.${id}-raised`,
        `fleet.notifications.alerts.critical.al-1.${id}-resolved`,
      ])
    })

    it('battery-low takes heartbeats too; a sensor in maintenance raises nothing', async () => {
      const publisher = testPublisher(rt)
      await publisher.publish({
        type: 'heartbeat.received',
        deviceId: 'al-2',
        data: { batteryPercent: 12 },
      })
      await publisher.publish({
        type: 'status.changed',
        deviceId: 'al-3',
        data: { status: 'maintenance' },
      })
      await publisher.publish({
        type: 'heartbeat.received',
        deviceId: 'al-3',
        data: { batteryPercent: 5 },
      })
      await caughtUp()
      expect((await alert('al-2', 'battery-low')).map((a) => a.state)).toEqual(['open'])
      expect(await alert('al-3', 'battery-low')).toEqual([])
    })

    it('a silent sensor raises the silent rule at the tick, and resolves it when heard again', async () => {
      const publisher = testPublisher(rt)
      await publisher.publish({
        type: 'sensor.registered',
        deviceId: 'al-4',
        data: { site: 'plant-c', model: 'm', firmware: '1', inactivityTimeoutSeconds: 1 },
      })
      await caughtUp()
      await new Promise((r) => setTimeout(r, 1100))
      const tick = await publisher.publish(tickDraft(Date.now()))
      await caughtUp()
      expect(await alert('al-4', 'sensor-silent')).toMatchObject([
        { state: 'open', raised_event_id: tick.event.eventId },
      ])
      await publisher.publish({ type: 'heartbeat.received', deviceId: 'al-4', data: {} })
      await caughtUp()
      expect((await alert('al-4', 'sensor-silent')).map((a) => a.state)).toEqual(['resolved'])
    })

    it('a mass silence raises every alert and notification at one tick, and clears them all again', async () => {
      // 12,000 sensors x 7 columns of notifications overflow the 16-bit parameter count of one
      // statement (alerts was stuck retrying it once); written in chunks, nothing is lost.
      const publisher = testPublisher(rt)
      const devices = Array.from({ length: 12_000 }, (_, i) => `mass-${i}`)
      const publishAll = async (draft: (d: string) => Parameters<typeof publisher.publish>[0]) => {
        for (let i = 0; i < devices.length; i += 500) {
          await Promise.all(devices.slice(i, i + 500).map((d) => publisher.publish(draft(d))))
        }
      }
      await publishAll((deviceId) => ({
        type: 'sensor.registered',
        deviceId,
        data: { site: 'plant-m', model: 'm', firmware: '1', inactivityTimeoutSeconds: 1 },
      }))
      await caughtUp()
      await new Promise((r) => setTimeout(r, 1100))
      const tick = await publisher.publish(tickDraft(Date.now()))
      await caughtUp()
      const count = async (state: 'open' | 'resolved') =>
        Number(
          (
            await rt.db
              .selectFrom('alerts')
              .select((eb) => eb.fn.countAll<string>().as('n'))
              .where('device_id', 'like', 'mass-%')
              .where('rule_id', '=', 'sensor-silent')
              .where('state', '=', state)
              .where('raised_event_id', '=', tick.event.eventId)
              .executeTakeFirstOrThrow()
          ).n,
        )
      const notifications = async (kind: 'raised' | 'resolved') =>
        Number(
          (
            await rt.db
              .selectFrom('notification_outbox as n')
              .innerJoin('alerts as a', 'a.alert_id', 'n.alert_id')
              .select((eb) => eb.fn.countAll<string>().as('n'))
              .where('a.device_id', 'like', 'mass-%')
              .where('n.kind', '=', kind)
              .executeTakeFirstOrThrow()
          ).n,
        )
      expect(await count('open')).toBe(devices.length)
      expect(await notifications('raised')).toBe(devices.length)

      await publishAll((deviceId) => ({ type: 'heartbeat.received', deviceId, data: {} }))
      await caughtUp()
      expect(await count('resolved')).toBe(devices.length)
      expect(await count('open')).toBe(0)
      expect(await notifications('resolved')).toBe(devices.length)
    }, 120_000)

    it('the CLI lists alerts and acknowledges one by publishing an event; an unknown id is refused', async () => {
      const publisher = testPublisher(rt)
      for (const value of [50, 51]) {
        await publisher.publish({
          type: 'reading.recorded',
          deviceId: 'al-6',
          data: { metric: 'temperature', value, unit: 'C' },
        })
      }
      await caughtUp()
      const env = testEnv(nats.url, rt.config.databaseUrl, {
        ALERT_RULES_FILE: rt.config.alertRulesFile!,
      })
      const listed = await runCli(
        ['alerts', 'list', '--state', 'open', '--device', 'al-6', '--json'],
        env,
      )
      expect(listed.code, listed.output).toBe(0)
      const [open] = JSON.parse(listed.output) as { alert_id: string; rule_id: string }[]
      expect(open?.rule_id).toBe('temperature-high')

      const ack = await runCli(
        ['alerts', 'ack', open!.alert_id, '--by', 'sam', '--note', 'fan replaced'],
        env,
      )
      expect(ack.code, ack.output).toBe(0)
      expect(ack.output).toContain(`acknowledged ${open!.alert_id} (al-6, temperature-high)`)
      await caughtUp()
      expect((await alert('al-6', 'temperature-high'))[0]).toMatchObject({
        state: 'acknowledged',
        acknowledged_by: 'sam',
      })
      const table = await runCli(['alerts', 'list', '--device', 'al-6'], env)
      expect(table.output).toMatch(
        new RegExp(`${open!.alert_id}\\s+critical\\s+acknowledged\\s+al-6\\s+temperature-high`),
      )

      const again = await runCli(['alerts', 'ack', open!.alert_id, '--by', 'sam'], env)
      expect(again.code).toBe(2)
      expect(again.output).toContain(
        `alert '${open!.alert_id}' is acknowledged; only an open alert can be acknowledged`,
      )
      const unknown = await runCli(['alerts', 'ack', 'al-0000', '--by', 'sam'], env)
      expect(unknown.code).toBe(2)
      expect(unknown.output).toContain("'alert' must be an existing alert id, got 'al-0000'")
    })

    it('the database allows at most one unresolved alert per sensor and rule, also from concurrent writers', async () => {
      const row = (id: string) => ({
        text: `insert into alerts (alert_id, device_id, rule_id, severity, state, message, raised_at, raised_hlc,
                 raised_event_id, correlation_id, occurrences, last_occurrence_event_id)
               values ($1, 'al-5', 'temperature-high', 'critical', 'open', 'm', now(), '1795000000000-000000-x', $1, $1, 1, $1)`,
        values: [id],
      })
      const a = new pg.Client(rt.config.databaseUrl)
      const b = new pg.Client(rt.config.databaseUrl)
      await Promise.all([a.connect(), b.connect()])
      await a.query('begin')
      await b.query('begin')
      await a.query(row('x-1'))
      // blocks on a's uncommitted row; its refusal may arrive before a's commit answer,
      // so the outcome is captured now rather than left as a rejection nobody holds yet
      const second = b.query(row('x-2')).then(
        () => 'inserted',
        (error: unknown) => error,
      )
      await a.query('commit')
      expect(await second).toMatchObject({
        code: '23505',
        constraint: 'alerts_one_unresolved',
      })
      await b.query('rollback')
      await Promise.all([a.end(), b.end()])
      expect(await alert('al-5', 'temperature-high')).toHaveLength(1)
    })
  })
})
