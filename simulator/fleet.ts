/**
 * A simulated fleet of sensors for `fleetstream simulate` and the tests: registrations, then
 * readings and heartbeats at a steady rate through the real publisher, with QoS-1 re-sends,
 * skewed device clocks, heat episodes that raise alerts, and network outages after which devices
 * replay what they held. Seeded, so a run can be repeated.
 */
import type { EventDraft, Publisher, PublishResult } from '../infra/publisher.ts'
import { PublishPipeline } from '../infra/publisher.ts'
import { sleep } from '../infra/sleep.ts'
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
  /** A network outage: a share of the fleet loses its connection at once and comes back at once. */
  readonly outage?: OutageOptions
}

/**
 * What the field reports describe: devices buffer events while disconnected and replay them in
 * order when they reconnect; when a network comes back, thousands reconnect at the same moment,
 * so each waits a random delay first (no synchronized work on reconnect).
 */
export interface OutageOptions {
  /** Share of devices that lose the connection (0..1). */
  readonly share: number
  /** Seconds into the run when it starts. */
  readonly atSeconds: number
  /** Seconds it lasts. */
  readonly forSeconds: number
  /** Each device reconnects after a random delay in [0, this) seconds. */
  readonly reconnectJitterSeconds: number
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
  /** Events devices held while disconnected, then replayed in order. */
  buffered: number
  /** Devices that reconnected after the outage. */
  reconnected: number
  /** Seconds from the end of the outage until the last device had replayed its buffer. */
  reconnectSeconds: number
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
  /** While disconnected (or replaying): events stamped when they happened, in order. */
  buffer: FleetEvent[] | undefined
}

/**
 * A fleet of sensors: registers each device (which then reports itself active), then publishes
 * readings and heartbeats at a steady rate, re-sending a share of earlier events under the same
 * eventId as QoS-1 devices do.
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
  const stats: SimulationStats = {
    sent: 0,
    resent: 0,
    duplicateAcks: 0,
    stored: 0,
    buffered: 0,
    reconnected: 0,
    reconnectSeconds: 0,
    elapsedMs: 0,
  }
  const recent: FleetEvent[] = []
  // The last 1000 stored events, candidates for a re-send (a ring: no draw from the seeded
  // generator here, since acks arrive in their own order).
  const remember = (e: FleetEvent) => {
    recent[stats.stored % 1000] = e
  }
  const pipe = new PublishPipeline(opts.window ?? 1024, (r: PublishResult) => {
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
    buffer: undefined,
  }))
  for (const d of devices) {
    if (signal?.aborted) break
    await send({
      type: 'sensor.registered',
      deviceId: d.id,
      occurredAt: deviceTime(d),
      data: { site: d.site, model: 'fs-th-200', firmware: '1.4.2' },
    })
    // A device reports itself online once it is registered, as a real one does after booting:
    // `nats sub 'fleet.events.*.status' --last` has something to show on a simulated fleet.
    await send({
      type: 'status.changed',
      deviceId: d.id,
      occurredAt: deviceTime(d),
      data: { status: 'active', reason: 'online after boot' },
    })
  }

  const endAt =
    opts.durationSeconds > 0 ? started + opts.durationSeconds * 1000 : Number.POSITIVE_INFINITY
  const loopStart = Date.now()
  const outage = opts.outage ? planOutage(opts.outage, devices, rnd, loopStart) : undefined
  const replays: Promise<void>[] = []
  const comeBack = async (d: Device, at: number) => {
    await sleep(at - Date.now(), signal ?? new AbortController().signal)
    await replay(publisher, d, pipe.onResult, signal)
    stats.reconnected++
    stats.reconnectSeconds = Math.max(
      stats.reconnectSeconds,
      (Date.now() - (outage?.endsAt ?? 0)) / 1000,
    )
  }
  const emit = async (d: Device, draft: EventDraft) => {
    if (d.buffer === undefined) {
      await send(draft)
      return
    }
    // Offline, or still replaying: keep it, stamped now, behind what is already held.
    const event = publisher.stamp(draft)
    d.buffer.push(event)
    stats.sent++
    stats.buffered++
  }
  let emitted = 0
  let lastProgress = 0
  while (!signal?.aborted && Date.now() < endAt && devices.length > 0) {
    if (outage) {
      for (const d of outage.disconnectNow(Date.now())) d.buffer = []
      for (const [d, at] of outage.reconnectNow(Date.now())) {
        replays.push(comeBack(d, at))
      }
    }
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
      if (d !== undefined) await emit(d, nextEvent(d, rnd))
    }
    if (onProgress && Date.now() - lastProgress >= 250) {
      stats.elapsedMs = Date.now() - started
      onProgress(stats)
      lastProgress = Date.now()
    }
    await new Promise((r) => setTimeout(r, 5))
  }
  // Devices still offline come back at their own time, even after the run: nothing they held is dropped.
  for (const [d, at] of outage?.remaining() ?? []) replays.push(comeBack(d, at))
  await Promise.all(replays)
  await pipe.drain()
  stats.elapsedMs = Date.now() - started
  onProgress?.(stats)
  return stats
}

interface OutagePlan {
  readonly endsAt: number
  /** Devices whose connection drops now (once). */
  disconnectNow(now: number): Device[]
  /** Devices due to reconnect now, each with its own (jittered) time (once). */
  reconnectNow(now: number): [Device, number][]
  /** Devices disconnected and not yet due, with their times (once). */
  remaining(): [Device, number][]
}

function planOutage(
  o: OutageOptions,
  devices: readonly Device[],
  rnd: () => number,
  start: number,
): OutagePlan {
  const affected = devices.filter(() => rnd() < o.share)
  const startsAt = start + o.atSeconds * 1000
  const endsAt = startsAt + o.forSeconds * 1000
  // Full jitter: each device picks its own moment, so the fleet does not come back in step.
  const schedule = affected.map(
    (d) => [d, endsAt + rnd() * o.reconnectJitterSeconds * 1000] as [Device, number],
  )
  let dropped = false
  return {
    endsAt,
    disconnectNow(now) {
      if (dropped || now < startsAt) return []
      dropped = true
      return affected
    },
    reconnectNow(now) {
      if (!dropped) return []
      const due = schedule.filter(([, at]) => at <= now)
      if (due.length > 0)
        schedule.splice(0, schedule.length, ...schedule.filter(([, at]) => at > now))
      return due
    },
    remaining() {
      return dropped ? schedule.splice(0, schedule.length) : []
    },
  }
}

/**
 * A device back online: replays what it held, oldest first, one PubAck at a time (a QoS-1 device
 * with one message in flight), then goes live. Events that happen meanwhile queue behind.
 */
async function replay(
  publisher: Publisher,
  d: Device,
  onResult: (r: PublishResult) => void,
  signal?: AbortSignal,
): Promise<void> {
  const buffer = d.buffer ?? []
  while (buffer.length > 0 && !signal?.aborted) {
    const next = buffer[0] as FleetEvent
    onResult(await publisher.publishEvent(next))
    buffer.shift()
  }
  d.buffer = undefined
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
