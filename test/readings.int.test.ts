import { headers } from '@nats-io/transport-node'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { PublishPipeline, type PublishResult } from '../infra/publisher.ts'
import { startProcessor } from '../processors/runner/runner.ts'
import { type RunningProcessor } from '../processors/runner/types.ts'
import { readingsProcessor } from '../processors/readings-processor.ts'
import { readCheckpoint } from '../processors/progress/checkpoints.ts'
import type { FleetEvent } from '../schemas/events.ts'
import { Headers } from '../schemas/subjects.ts'
import type { Runtime } from '../app/runtime.ts'
import { freshDatabase, startNatsServer, type NatsServer } from './harness/test-servers.ts'
import {
  pastDedupWindow,
  readingDraft,
  testConfig,
  testPublisher,
  testRuntime,
  waitFor,
} from './fixtures.ts'

// One server and database per scenario, so row counts are exact.
async function scenario(env: Record<string, string> = {}) {
  const nats = await startNatsServer()
  const rt = await testRuntime(testConfig(nats.url, await freshDatabase(), env))
  const processor = startProcessor(readingsProcessor, rt)
  return { nats, rt, processor }
}

async function close(s: { nats: NatsServer; rt: Runtime; processor: RunningProcessor }) {
  await s.processor.stop()
  await s.rt.close()
  await s.nats.cleanup()
}

async function caughtUp(rt: Runtime, processor: RunningProcessor) {
  const last = (await rt.jsm.streams.info(rt.config.streams.events)).state.last_seq
  await waitFor(
    `checkpoint to reach stream sequence ${last}`,
    () => processor.stats.checkpoint >= last,
    60_000,
    () => JSON.stringify(processor.stats),
  )
}

describe('readings processor', () => {
  describe('10,000 events, 10% re-published under the same eventId', () => {
    let s: Awaited<ReturnType<typeof scenario>>
    beforeAll(async () => {
      s = await scenario()
    })
    afterAll(async () => close(s))

    it('stores exactly the distinct events and the PubAcks report the duplicates', async () => {
      const publisher = testPublisher(s.rt)
      const results: PublishResult[] = []
      const pipe = new PublishPipeline(256, (r) => results.push(r))
      const sent: FleetEvent[] = []
      for (let i = 0; i < 10_000; i++) {
        const event = publisher.stamp(
          readingDraft(
            `sensor-${i % 100}`,
            i,
            Math.floor(i / 100) % 2 ? 'temperature' : 'humidity',
          ),
        )
        sent.push(event)
        await pipe.submit(() => publisher.publishEvent(event))
        if (i % 10 === 9) {
          const again = sent[i - 5]!
          await pipe.submit(() => publisher.publishEvent(again))
        }
      }
      await pipe.drain()

      expect(results).toHaveLength(11_000)
      expect(results.filter((r) => r.duplicate)).toHaveLength(1_000)
      expect(publisher.stats).toEqual({ published: 10_000, duplicates: 1_000, failed: 0 })

      await caughtUp(s.rt, s.processor)
      const rows = await s.rt.db
        .selectFrom('readings')
        .select((eb) => [
          eb.fn.countAll<number>().as('n'),
          eb.fn.count<number>('event_id').distinct().as('distinct'),
        ])
        .executeTakeFirstOrThrow()
      expect(rows).toEqual({ n: 10_000, distinct: 10_000 })
      const ids = await s.rt.db.selectFrom('readings').select('event_id').execute()
      expect(new Set(ids.map((r) => r.event_id))).toEqual(new Set(sent.map((e) => e.eventId)))
      // latest value per sensor and metric is the last one each sensor sent
      const latest = await s.rt.db
        .selectFrom('latest_readings')
        .selectAll()
        .where('device_id', '=', 'sensor-7')
        .execute()
      expect(Object.fromEntries(latest.map((l) => [l.metric, l.value]))).toEqual({
        temperature: 9907,
        humidity: 9807,
      })
      const cp = await readCheckpoint(s.rt.db, 'readings')
      expect(cp.lastSeq).toBe(10_000)
    })
  })

  describe('order and idempotency', () => {
    let s: Awaited<ReturnType<typeof scenario>>
    beforeAll(async () => {
      // A 1 s duplicate window so that a re-publish "hours later" can be played in a second.
      s = await scenario({ FLEET_DUPLICATE_WINDOW_SECONDS: '1' })
    })
    afterAll(async () => close(s))

    it('a reading that arrives late (older HLC) does not replace the newer latest value', async () => {
      const publisher = testPublisher(s.rt)
      const older = publisher.stamp(readingDraft('late-1', 10))
      const newer = publisher.stamp(readingDraft('late-1', 20))
      expect(older.hlc < newer.hlc).toBe(true)
      await publisher.publishEvent(newer)
      await caughtUp(s.rt, s.processor)
      await publisher.publishEvent(older)
      await caughtUp(s.rt, s.processor)

      const latest = await s.rt.db
        .selectFrom('latest_readings')
        .selectAll()
        .where('device_id', '=', 'late-1')
        .execute()
      expect(latest).toHaveLength(1)
      expect(latest[0]).toMatchObject({ value: 20, event_id: newer.eventId, hlc: newer.hlc })
      const history = await s.rt.db
        .selectFrom('readings')
        .select('value')
        .where('device_id', '=', 'late-1')
        .orderBy('hlc')
        .execute()
      expect(history.map((r) => r.value)).toEqual([10, 20])
    })

    it('an event re-published outside the dedup window (new stream sequence) changes nothing', async () => {
      const publisher = testPublisher(s.rt)
      const first = await publisher.publish(readingDraft('dup-1', 1))
      await caughtUp(s.rt, s.processor)
      const before = await s.rt.db
        .selectFrom('readings')
        .selectAll()
        .where('device_id', '=', 'dup-1')
        .execute()

      await pastDedupWindow()
      const again = await publisher.publishEvent(first.event)
      expect(again.duplicate).toBe(false)
      expect(again.seq).toBeGreaterThan(first.seq)
      await caughtUp(s.rt, s.processor)

      const after = await s.rt.db
        .selectFrom('readings')
        .selectAll()
        .where('device_id', '=', 'dup-1')
        .execute()
      expect(after).toEqual(before)
      expect(after[0]?.stream_seq).toBe(first.seq)
    })
  })

  describe('malformed events', () => {
    let s: Awaited<ReturnType<typeof scenario>>
    beforeAll(async () => {
      s = await scenario()
    })
    afterAll(async () => close(s))

    it('never reach the tables, are parked in FLEET_DLQ with their reason, and the rest go on', async () => {
      const publisher = testPublisher(s.rt)
      const good = publisher.stamp(readingDraft('sensor-1', 1))
      const raw = (subject: string, body: string, msgId: string, hlc = good.hlc) => {
        const h = headers()
        h.set(Headers.Hlc, hlc)
        return s.rt.js.publish(subject, body, { msgID: msgId, headers: h })
      }
      const json = (patch: Record<string, unknown>) =>
        JSON.stringify({ ...good, eventId: String(patch.eventId), ...patch })
      await raw('fleet.events.sensor-1.reading', '{"eventId": "bad-json", ', 'bad-json')
      await raw(
        'fleet.events.sensor-1.reading',
        json({ eventId: 'bad-type', type: 'reading.deleted' }),
        'bad-type',
      )
      await raw(
        'fleet.events.sensor-1.reading',
        json({ eventId: 'bad-value' }).replace('"value":1', '"value":1e999'),
        'bad-value',
      )
      await raw(
        'fleet.events.sensor-1.reading',
        json({ eventId: 'bad-device', deviceId: 'Sensor 7' }),
        'bad-device',
      )
      // A device clock far ahead: quarantined, never applied.
      const future = `${String(Date.now() + 3_600_000)}-000000-rogue`
      await raw(
        'fleet.events.sensor-1.reading',
        json({ eventId: 'skewed', hlc: future }),
        'skewed',
        future,
      )
      await publisher.publishEvent(good)
      await caughtUp(s.rt, s.processor)

      const rows = await s.rt.db.selectFrom('readings').select('event_id').execute()
      expect(rows.map((r) => r.event_id)).toEqual([good.eventId])
      expect(s.processor.stats.rejected).toBe(5)

      const dlq = await s.rt.jsm.streams.info(s.rt.config.streams.dlq)
      expect(dlq.state.messages).toBe(5)
      const parked = []
      for (let seq = 1; seq <= 5; seq++) {
        const m = await s.rt.jsm.streams.getMessage(s.rt.config.streams.dlq, { seq })
        if (m === null) throw new Error(`FLEET_DLQ has no message ${seq}`)
        parked.push({
          subject: m.subject,
          id: m.header.get(Headers.DlqKey),
          reason: m.header.get(Headers.DlqReason),
          detail: m.header.get(Headers.DlqDetail),
          seq: m.header.get(Headers.DlqStreamSeq),
          processor: m.header.get(Headers.DlqProcessor),
        })
      }
      expect(parked.map((p) => [p.id, p.reason])).toEqual([
        ['bad-json', 'invalid-json'],
        ['bad-type', 'invalid-event'],
        ['bad-value', 'invalid-event'],
        ['bad-device', 'invalid-event'],
        ['skewed', 'clock-skew'],
      ])
      expect(
        parked.every((p) => p.subject === 'fleet.dlq.readings' && p.processor === 'readings'),
      ).toBe(true)
      expect(parked.map((p) => p.seq)).toEqual(['1', '2', '3', '4', '5'])
      expect(parked[1]?.detail).toContain("'type' must be one of")
      expect(parked[2]?.detail).toBe("'data.value' must be a finite number, got Infinity")
      expect(parked[3]?.detail).toContain(
        "'deviceId' must match /^[a-z0-9-]{1,64}$/, got 'Sensor 7'",
      )
    })
  })
})
