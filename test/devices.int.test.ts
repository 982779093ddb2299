import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { PROCESSOR_NAMES } from '../processors/processor-registry.ts'
import type { FleetEvent } from '../schemas/events.ts'
import { simulateFleet } from '../simulator/fleet.ts'
import { allCaughtUp, pipeline, testPublisher, type Pipeline } from './fixtures.ts'

describe('devices that lose the network', () => {
  let p: Pipeline
  beforeAll(async () => {
    p = await pipeline()
    p.start()
  })
  afterAll(async () => p.close())

  it('buffer while offline, come back at jittered moments, replay in order, and nothing they held is lost', async () => {
    const publisher = testPublisher(p.rt, 'gw')
    const stats = await simulateFleet(publisher, {
      devices: 300,
      rate: 1500,
      durationSeconds: 4,
      duplicateRatio: 0,
      seed: 42,
      outage: { share: 0.6, atSeconds: 1, forSeconds: 1.5, reconnectJitterSeconds: 2 },
    })
    expect(stats.buffered).toBeGreaterThan(100)
    expect(stats.reconnected).toBeGreaterThan(150)
    // Spread over the jitter window, not all in the same instant.
    expect(stats.reconnectSeconds).toBeGreaterThan(1)
    expect(stats.stored).toBe(stats.sent)

    await allCaughtUp(p.rt, PROCESSOR_NAMES)
    const info = await p.rt.jsm.streams.info(p.rt.config.streams.events)
    expect(info.state.messages).toBe(stats.sent)
    // Per device, the stream holds its events in the order they happened.
    const last = new Map<string, string>()
    let outOfOrder = 0
    let readingEvents = 0
    for (let seq = 1; seq <= info.state.last_seq; seq++) {
      const e = (await p.rt.jsm.streams.getMessage(p.rt.config.streams.events, {
        seq,
      }))!.json<FleetEvent>()
      if ((last.get(e.deviceId) ?? '') > e.hlc) outOfOrder++
      if (e.type === 'reading.recorded') readingEvents++
      last.set(e.deviceId, e.hlc)
    }
    expect(outOfOrder).toBe(0)
    const readings = await p.rt.pool.query<{ n: string }>('select count(*) as n from readings')
    const sensors = await p.rt.pool.query<{ n: string }>('select count(*) as n from sensor_status')
    expect(Number(sensors.rows[0]!.n)).toBe(300)
    expect(Number(readings.rows[0]!.n)).toBe(readingEvents)
  })
})
