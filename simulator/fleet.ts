import type { EventDraft, Publisher, PublishResult } from '../infra/publisher.ts'
import { PublishPipeline } from '../infra/publisher.ts'
import type { FleetEvent } from '../schemas/events.ts'

export interface SimulationOptions {
  /** Number of simulated sensors. */
  readonly devices: number
  /** Events per second across the fleet (registrations excluded). */
  readonly rate: number
  /** Seconds to run; 0 runs until the signal aborts. */
  readonly durationSeconds: number
  /** Share of publishes that re-send an earlier event with the same eventId (0..1). */
  readonly duplicateRatio: number
  /** Seed for a repeatable fleet. */
  readonly seed?: number
  /** Publishes in flight at once. */
  readonly window?: number
  /** Device ids are `<prefix>-<n>`. */
  readonly devicePrefix?: string
  readonly sites?: number
}

export interface SimulationStats {
  /** Distinct events sent (registrations included). */
  sent: number
  /** Re-sends of an earlier event. */
  resent: number
  /** PubAcks that reported a duplicate (the stream stored nothing). */
  duplicateAcks: number
  /** PubAcks for new events. */
  stored: number
  elapsedMs: number
}

interface Device {
  readonly id: string
  readonly site: string
  /** How far this device's clock is off, in ms (devices disagree; order comes from the HLC). */
  readonly clockSkewMs: number
  temperature: number
  humidity: number
  battery: number
  /** Readings left in a heat episode (a fault that should raise a temperature alert). */
  hot: number
}

/**
 * A fleet of sensors: registers each device, then publishes readings and heartbeats at a steady
 * rate, re-sending a share of earlier events under the same eventId as QoS-1 devices do.
 *
 * ```ts
 * const stats = await simulateFleet(publisher, { devices: 100, rate: 500, durationSeconds: 10, duplicateRatio: 0.05 })
 * ```
 */
export async function simulateFleet(
  publisher: Publisher,
  opts: SimulationOptions,
  signal?: AbortSignal,
  onProgress?: (s: Readonly<SimulationStats>) => void,
): Promise<SimulationStats> {
  const rnd = mulberry32(opts.seed ?? Date.now())
  const prefix = opts.devicePrefix ?? 'sensor'
  const sites = Math.max(1, opts.sites ?? Math.ceil(opts.devices / 50))
  const stats: SimulationStats = { sent: 0, resent: 0, duplicateAcks: 0, stored: 0, elapsedMs: 0 }
  const recent: FleetEvent[] = []
  // The last 1000 stored events, candidates for a re-send (a ring: no draw from the seeded
  // generator here, since acks arrive in their own order).
  const remember = (e: FleetEvent) => {
    recent[stats.stored % 1000] = e
  }
  const pipe = new PublishPipeline(opts.window ?? 256, (r: PublishResult) => {
    if (r.duplicate) stats.duplicateAcks++
    else {
      stats.stored++
      remember(r.event)
    }
  })
  const started = Date.now()
  const send = async (draft: EventDraft) => {
    stats.sent++
    await pipe.submit(() => publisher.publish(draft))
  }

  const devices: Device[] = Array.from({ length: opts.devices }, (_, i) => ({
    id: `${prefix}-${String(i + 1).padStart(5, '0')}`,
    site: `site-${String((i % sites) + 1).padStart(3, '0')}`,
    clockSkewMs: Math.round((rnd() - 0.5) * 4000),
    temperature: 15 + rnd() * 10,
    humidity: 30 + rnd() * 40,
    battery: 60 + rnd() * 40,
    hot: 0,
  }))
  for (const d of devices) {
    if (signal?.aborted) break
    await send({
      type: 'sensor.registered',
      deviceId: d.id,
      occurredAt: deviceTime(d),
      data: { site: d.site, model: 'fs-th-200', firmware: '1.4.2' },
    })
  }

  const endAt =
    opts.durationSeconds > 0 ? started + opts.durationSeconds * 1000 : Number.POSITIVE_INFINITY
  const loopStart = Date.now()
  let emitted = 0
  let lastProgress = 0
  while (!signal?.aborted && Date.now() < endAt && devices.length > 0) {
    const due = Math.floor(((Date.now() - loopStart) / 1000) * opts.rate)
    // Checks the deadline too: a rate the machine cannot reach must not stretch the run.
    while (emitted < due && !signal?.aborted && Date.now() < endAt) {
      emitted++
      if (recent.length > 0 && rnd() < opts.duplicateRatio) {
        const again = recent[Math.floor(rnd() * recent.length)]
        if (again !== undefined) {
          stats.resent++
          await pipe.submit(() => publisher.publishEvent(again))
          continue
        }
      }
      const d = devices[Math.floor(rnd() * devices.length)]
      if (d !== undefined) await send(nextEvent(d, rnd))
    }
    if (onProgress && Date.now() - lastProgress >= 250) {
      stats.elapsedMs = Date.now() - started
      onProgress(stats)
      lastProgress = Date.now()
    }
    await new Promise((r) => setTimeout(r, 5))
  }
  await pipe.drain()
  stats.elapsedMs = Date.now() - started
  onProgress?.(stats)
  return stats
}

function nextEvent(d: Device, rnd: () => number): EventDraft {
  const roll = rnd()
  const occurredAt = deviceTime(d)
  if (roll < 0.1) {
    d.battery = Math.max(0, d.battery - rnd() * 0.05)
    return {
      type: 'heartbeat.received',
      deviceId: d.id,
      occurredAt,
      data: { batteryPercent: round(d.battery), rssiDbm: -50 - Math.round(rnd() * 40) },
    }
  }
  if (roll < 0.55) {
    d.temperature += (rnd() - 0.5) * 0.4
    // Now and then a sensor overheats for a few readings, then recovers.
    if (d.hot === 0 && rnd() < 0.002) d.hot = 6
    const hot = d.hot > 0
    if (hot) d.hot--
    return reading(d, occurredAt, 'temperature', hot ? d.temperature + 35 : d.temperature, 'C')
  }
  if (roll < 0.9) {
    d.humidity = Math.min(100, Math.max(0, d.humidity + (rnd() - 0.5)))
    return reading(d, occurredAt, 'humidity', d.humidity, '%')
  }
  return reading(d, occurredAt, 'battery', d.battery, '%')
}

function reading(
  d: Device,
  occurredAt: string,
  metric: string,
  value: number,
  unit: string,
): EventDraft {
  return {
    type: 'reading.recorded',
    deviceId: d.id,
    occurredAt,
    data: { metric, value: round(value), unit },
  }
}

function deviceTime(d: Device): string {
  return new Date(Date.now() + d.clockSkewMs).toISOString()
}

function round(v: number): number {
  return Math.round(v * 100) / 100
}

/** Small seeded PRNG so a simulation can be repeated. */
function mulberry32(seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}
