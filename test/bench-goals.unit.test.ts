import { afterEach, describe, expect, it, vi } from 'vitest'
import { beside, cpuFloor, type Figures, goals, printReport } from '../bench/report.ts'

const rate = (events: number, r: number) => ({ events, seconds: events / r, rate: r })
const each = <T>(v: T) => ({ readings: v, 'sensor-status': v, alerts: v })

/** A 1M run that meets every goal of issue 13, with (d) below (b) so that (d) is the limit. */
function figures(
  over: { events?: number; e2e?: number; latencyRate?: number; alerts?: number } = {},
): Figures {
  const events = over.events ?? 1_000_000
  return {
    machine: {
      cores: 2,
      cpu: 'x',
      node: 'v20',
      natsServer: '2.9.10',
      postgres: '15',
      loadAtStart: 0.5,
    },
    events,
    devices: 10_000,
    payloadBytes: 300,
    limits: {
      corePublish: rate(events, 100_000),
      rawConsume: { ...rate(events, 180_000), natsCpuUsPerEvent: 3, benchCpuUsPerEvent: 4 },
      rawWrite: rate(events, 60_000),
      jobWrite: {
        ...rate(events, 20_000),
        batch: 5000,
        perModel: each(50),
        postgresCpuUsPerEvent: 60,
        benchCpuUsPerEvent: 5,
      },
    },
    naive: rate(10_000, 3000),
    publishCeiling: {
      ...rate(events, 90_000),
      window: 1024,
      natsCpuUsPerEvent: 12,
      benchCpuUsPerEvent: 3,
    },
    fleetstream: {
      ingest: rate(events, 70_000),
      startupAlone: {
        seconds: { ...each(0.6), alerts: over.alerts ?? 0.7 },
        applied: each(1000),
      },
      endToEnd: {
        ...rate(events, over.e2e ?? 12_000),
        startupSeconds: each(0.4),
        caughtUpSeconds: each(80),
        cpuUsPerEvent: { ...each(30), 'nats-server': 10, postgres: 60 },
      },
      latency: {
        targetRate: 5000,
        rate: over.latencyRate ?? 4990,
        published: 75_000,
        samples: 7500,
        missing: 0,
        p50Ms: 20,
        p99Ms: 120,
        maxMs: 200,
        pollMs: 10,
        cpuCores: {
          ...each(0.2),
          'nats-server': 0.3,
          postgres: 0.5,
          'bench (publisher, poller)': 0.2,
        },
      },
      rebuild: each({ applied: events, seconds: events / 40_000, wallSeconds: 30, rate: 40_000 }),
      peakRssMb: each(120),
      cpuSeconds: each(30),
      wallSeconds: 100,
    },
    rows: { readings: { processors: events, job: events } },
    scaleOut: {
      partitions: 4,
      runs: [
        {
          ...rate(200_000, 10_000),
          instances: 1,
          startupSeconds: each(0.4),
          caughtUpSeconds: each(20),
          peakRssMb: 150,
        },
        {
          ...rate(200_000, 9_500),
          instances: 2,
          startupSeconds: each(0.4),
          caughtUpSeconds: each(21),
          peakRssMb: 150,
        },
      ],
    },
    bench: { seconds: 900, peakRssMb: 2000, loadAtEnd: 0.8 },
  }
}

describe('bench goals (issue 13)', () => {
  afterEach(() => {
    vi.restoreAllMocks()
  })

  it('judges every goal of the issue, each with its figure and threshold', () => {
    const gs = goals(figures())
    expect(gs).toHaveLength(12)
    expect(gs.filter((g) => !g.met)).toEqual([])
    expect(gs[0]).toMatchObject({
      figure: '12,000 ev/s = 60% of 20,000',
      threshold: '>= 10,000 ev/s',
    })
  })

  it('measures end to end against (d), the job write limit, when (d) is below raw consume', () => {
    const [limit, naive] = goals(figures({ e2e: 9_000 }))
    expect(limit).toMatchObject({ met: false, threshold: '>= 10,000 ev/s' })
    expect(naive).toMatchObject({ met: true, threshold: '>= 3.00x' })
  })

  it("bounds end to end by the job's CPU floor: (d)'s Postgres and client, three raw consumes", () => {
    // 60 + 5 (d), 3 x (3 + 4) (b): 86 us per event on 2 cores.
    expect(cpuFloor(figures()).usPerEvent).toBe(86)
    const naive = goals(figures()).find((g) => g.goal === 'end to end >= 3x naive')
    expect(naive?.figure).toContain('the CPU floor allows at most 23,256 ev/s = 7.75x')
  })

  it('misses the latency goal when the publisher did not reach the rate, whatever the p99', () => {
    const latency = goals(figures({ latencyRate: 4000 })).find((g) => g.goal.startsWith('p99'))
    expect(latency?.met).toBe(false)
    expect(latency?.figure).toContain('reached 4,000 of 5,000 ev/s asked')
  })

  it('judges start-up on each processor started alone, and shows the three started at once', () => {
    const startup = (alerts: number) =>
      goals(figures({ alerts })).find((g) => g.goal.startsWith('start-up'))
    expect(startup(0.7)).toMatchObject({
      met: true,
      figure:
        'readings 0.60 s, sensor-status 0.60 s, alerts 0.70 s (all three at once, end-to-end phase: 0.40 s / 0.40 s / 0.40 s)',
    })
    expect(startup(1.2)?.met).toBe(false)
  })

  it('prints MET/MISS per goal and says a quick run is not the judged size', () => {
    let out = ''
    vi.spyOn(process.stdout, 'write').mockImplementation((s) => {
      out += String(s)
      return true
    })
    printReport(figures({ events: 20_000 }), false)
    expect(out).toContain('NOT JUDGED, this run had 20,000 events')
    expect(out.match(/^ {2}MET {2}/gm)).toHaveLength(12)
    out = ''
    printReport(figures(), false)
    expect(out).toContain('goals of issue 13 (judged: 1,000,000 events): 12/12 met')
  })

  it("shows the cores the end-to-end phase used and its tail, the last processor's run alone", () => {
    let out = ''
    vi.spyOn(process.stdout, 'write').mockImplementation((s) => {
      out += String(s)
      return true
    })
    const f = figures()
    const e2e = f.fleetstream.endToEnd
    const caughtUpSeconds = { 'sensor-status': 50.5, readings: 64.5, alerts: 83.3 }
    printReport(
      { ...f, fleetstream: { ...f.fleetstream, endToEnd: { ...e2e, caughtUpSeconds } } },
      false,
    )
    // 160 us of CPU per event for 1M events in 83.3 s: 1.92 cores.
    const row = out.split('\n').find((l) => l.includes('cores used, end-to-end phase'))
    expect(row).toMatch(/1\.92 of 2 +on average; alerts ran 18\.8 s after the others had caught up/)
  })
})

describe('beside', () => {
  it('shows a figure on the side of its threshold that it is on', () => {
    expect(beside(0.8955, 0.9, 2)).toBe('0.895')
    expect(beside(0.8999, 0.9, 2)).toBe('0.8999')
    expect(beside(0.93, 0.9, 2)).toBe('0.93')
    expect(beside(0.9, 0.9, 2)).toBe('0.90')
    expect(beside(49.6, 50, 0)).toBe('49.6')
    expect(beside(50.4, 50, 0)).toBe('50')
    expect(beside(47.2, 50, 0)).toBe('47')
  })
})
