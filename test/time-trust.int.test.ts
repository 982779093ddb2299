import { headers as natsHeaders } from '@nats-io/transport-node'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import type { Runtime } from '../app/runtime.ts'
import { eventHeaders, type Publisher } from '../infra/publisher.ts'
import { startProcessor } from '../processors/runner/runner.ts'
import { type RunningProcessor } from '../processors/runner/types.ts'
import type { FleetEvent } from '../schemas/events.ts'
import { encodeHlc } from '../schemas/hlc.ts'
import { eventSubject, Headers } from '../schemas/subjects.ts'
import { freshDatabase, startNatsServer, type NatsServer } from './harness/test-servers.ts'
import {
  readingDraft,
  testConfig,
  testPublisher,
  testRuntime,
  tickDraft,
  waitFor,
} from './fixtures.ts'

/**
 * Time a message claims is held to the stream's append time (issue 12, item 11), through the
 * real sensor-status processor: a forged tick, an HLC from long ago, a Fleet-Hlc header that
 * disagrees with the body. Each is parked once with its reason and moves no state and no clock.
 */
describe('time a device claims', () => {
  let nats: NatsServer
  let rt: Runtime
  let publisher: Publisher
  let status: RunningProcessor
  beforeEach(async () => {
    nats = await startNatsServer()
    rt = await testRuntime(
      testConfig(nats.url, await freshDatabase(), { SENSOR_INACTIVITY_TIMEOUT_SECONDS: '30' }),
    )
    publisher = testPublisher(rt)
    status = startProcessor(rt.processors['sensor-status'], rt)
  })
  afterEach(async () => {
    await status.stop()
    await rt.close()
    await nats.cleanup()
  })

  const publishRaw = async (event: FleetEvent, h = eventHeaders(event)) =>
    (
      await rt.js.publish(eventSubject(event.deviceId, event.type), JSON.stringify(event), {
        msgID: event.eventId,
        headers: h,
      })
    ).seq
  const caughtUp = (seq: number) =>
    waitFor(
      `sensor-status to pass ${seq}`,
      () => status.stats.checkpoint >= seq,
      30_000,
      () => JSON.stringify(status.stats),
    )
  const dlq = async () => {
    const last = (await rt.jsm.streams.info(rt.config.streams.dlq)).state.last_seq
    const out: { id: string; reason: string; detail: string }[] = []
    for (let seq = 1; seq <= last; seq++) {
      const m = await rt.jsm.streams.getMessage(rt.config.streams.dlq, { seq })
      out.push({
        id: m!.header.get(Headers.DlqKey),
        reason: m!.header.get(Headers.DlqReason),
        detail: m!.header.get(Headers.DlqDetail),
      })
    }
    return out
  }
  const clock = async () =>
    (await rt.db.selectFrom('projection_clocks').select('now_at').execute()).map((r) =>
      r.now_at.toISOString(),
    )
  const sensor = async (id: string) =>
    (
      await rt.db
        .selectFrom('sensor_status')
        .select('status')
        .where('device_id', '=', id)
        .executeTakeFirst()
    )?.status

  it('a tick a year ahead, with a current HLC, is parked as clock-skew: stream time does not move, sensors stay active', async () => {
    await publisher.publish({
      type: 'sensor.registered',
      deviceId: 'sensor-1',
      data: { site: 's', model: 'm', firmware: 'f' },
    })
    const now = Date.now()
    const honest = await publisher.publish(tickDraft(Math.floor(now / 10_000) * 10_000))
    await caughtUp(honest.seq)
    const before = await clock()

    const forged = publisher.stamp(tickDraft(now + 365 * 24 * 3600 * 1000))
    const seq = await publishRaw(forged)
    const after = (await publisher.publish(readingDraft('sensor-1', 21))).seq
    await caughtUp(after)

    const parked = await dlq()
    expect(parked.map((p) => [p.id, p.reason])).toEqual([[forged.eventId, 'clock-skew']])
    expect(parked[0]?.detail).toMatch(
      new RegExp(
        `^'data.at' '${forged.data.at}' is \\d+ ms ahead of the stream's append time .*, more than the max offset of 500 ms \\(HLC_MAX_OFFSET_MS\\)$`,
      ),
    )
    expect(await clock()).toEqual(before)
    expect(await sensor('sensor-1')).toBe('active')
    expect(status.stats.checkpoint).toBeGreaterThan(seq)
  })

  it('an HLC from 2001 and an HLC of 0 are parked as clock-skew, each once', async () => {
    const draft = readingDraft('sensor-2', 21)
    const from2001 = {
      ...publisher.stamp(draft),
      hlc: encodeHlc({ wallMs: Date.parse('2001-09-09T01:46:40Z'), logical: 0, node: 'old-gw' }),
    }
    const zero = { ...publisher.stamp(draft), hlc: '0000000000000-000000-gw' }
    await publishRaw(from2001)
    await publishRaw(zero)
    const last = (await publisher.publish(readingDraft('sensor-3', 21))).seq
    await caughtUp(last)

    const parked = await dlq()
    expect(parked.map((p) => [p.id, p.reason])).toEqual([
      [from2001.eventId, 'clock-skew'],
      [zero.eventId, 'clock-skew'],
    ])
    expect(parked[0]?.detail).toMatch(
      new RegExp(
        `^HLC '${from2001.hlc}' is \\d+ ms behind the reference clock, more than the max age of 604800000 ms$`,
      ),
    )
    expect(parked[1]?.detail).toContain(`HLC '${zero.hlc}' is`)
    expect(await sensor('sensor-2')).toBeUndefined()
    expect(await sensor('sensor-3')).toBe('active')
  })

  it('a Fleet-Hlc header that disagrees with the body is parked, naming both values', async () => {
    const event = publisher.stamp(readingDraft('sensor-4', 21))
    const h = eventHeaders(event)
    const claimed = encodeHlc({ wallMs: Date.now() - 60_000, logical: 3, node: 'other-gw' })
    h.set(Headers.Hlc, claimed)
    await publishRaw(event, h)
    const plain = natsHeaders()
    const noHeader = publisher.stamp(readingDraft('sensor-5', 21))
    const last = await publishRaw(noHeader, plain) // as an MQTT device sends: no Fleet-Hlc at all
    await caughtUp(last)

    const parked = await dlq()
    expect(parked).toEqual([
      {
        id: event.eventId,
        reason: 'subject-mismatch',
        detail: `header 'Fleet-Hlc' must equal 'hlc' '${event.hlc}', got '${claimed}'`,
      },
    ])
    expect(await sensor('sensor-4')).toBeUndefined()
    expect(await sensor('sensor-5')).toBe('active')
  })
})
