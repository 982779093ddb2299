import { readFile } from 'node:fs/promises'
import { networkInterfaces } from 'node:os'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startNatsServer, type NatsServer } from './harness/test-servers.ts'
import { freshDatabase } from './harness/test-servers.ts'
import { spawnCli, testEnv, waitFor, type CliProcess } from './fixtures.ts'

/** The addresses the sockets listening on `port` are bound to, from the kernel's tables. */
async function listeningAddresses(port: number): Promise<string[]> {
  const out: string[] = []
  for (const [file, v6] of [
    ['/proc/net/tcp', false],
    ['/proc/net/tcp6', true],
  ] as const) {
    const text = await readFile(file, 'utf8').catch(() => '')
    for (const line of text.split('\n').slice(1)) {
      const [, local, , state] = line.trim().split(/\s+/)
      if (state !== '0A' || local === undefined) continue // 0A: LISTEN
      const [hexAddr = '', hexPort = ''] = local.split(':')
      if (parseInt(hexPort, 16) !== port) continue
      out.push(v6 ? ipv6(hexAddr) : ipv4(hexAddr))
    }
  }
  return out
}

function ipv4(hex: string): string {
  // Little-endian on the machines this runs on (x86-64, arm64).
  return [3, 2, 1, 0].map((i) => parseInt(hex.slice(i * 2, i * 2 + 2), 16)).join('.')
}

function ipv6(hex: string): string {
  if (/^0+$/.test(hex)) return '::'
  if (hex === '00000000000000000000000001000000') return '::1'
  return hex
}

/** An address of this machine that is not loopback, if it has one. */
function externalIPv4(): string | undefined {
  for (const addrs of Object.values(networkInterfaces()))
    for (const a of addrs ?? []) if (a.family === 'IPv4' && !a.internal) return a.address
  return undefined
}

/** The port from the process's own start-up log line. */
async function metricsPort(proc: CliProcess): Promise<number> {
  let port: number | undefined
  await waitFor(
    'the metrics server to log its address',
    () => {
      const m = /"url":"http:\/\/[^"]*:(\d+)"/.exec(proc.output())
      port = m ? Number(m[1]) : undefined
      return port !== undefined
    },
    30_000,
    proc.output,
  )
  return port!
}

async function reachable(url: string): Promise<boolean> {
  try {
    await fetch(url, { signal: AbortSignal.timeout(5000) })
    return true
  } catch {
    return false
  }
}

async function metricValue(base: string, name: string): Promise<number | undefined> {
  const text = await (await fetch(`${base}/metrics`)).text()
  const m = new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)$`, 'm').exec(text)
  return m ? Number(m[1]) : undefined
}

/**
 * The metrics and health endpoints of `run` have no authentication: they listen on loopback
 * unless told otherwise, and a flood of scrapes costs NATS and Postgres nothing.
 */
describe('exposure of /metrics, /healthz and /readyz', () => {
  let nats: NatsServer
  let env: Record<string, string>
  const procs: CliProcess[] = []

  beforeAll(async () => {
    nats = await startNatsServer()
    const { METRICS_HOST: _host, ...rest } = testEnv(nats.url, await freshDatabase(), {
      LOG_LEVEL: 'info',
    })
    env = rest // METRICS_HOST unset: the default
  })
  afterAll(async () => {
    for (const p of procs) {
      if (p.child.exitCode === null) p.child.kill('SIGKILL')
      await p.exited
    }
    await nats.cleanup()
  })

  const start = (extra: Record<string, string> = {}) => {
    const p = spawnCli(['run', 'readings', '--no-clock'], { ...env, ...extra })
    procs.push(p)
    return p
  }

  it('listens on loopback only by default', async () => {
    const proc = start()
    const port = await metricsPort(proc)
    expect(await listeningAddresses(port)).toEqual(['127.0.0.1'])
    expect(await reachable(`http://127.0.0.1:${port}/healthz`)).toBe(true)
    const external = externalIPv4()
    if (external !== undefined)
      expect(await reachable(`http://${external}:${port}/healthz`)).toBe(false)
    proc.child.kill('SIGTERM')
    expect(await proc.exited).toBe(0)
  })

  it('listens where METRICS_HOST says', async () => {
    const proc = start({ METRICS_HOST: '0.0.0.0' })
    const port = await metricsPort(proc)
    expect(await listeningAddresses(port)).toEqual(['0.0.0.0'])
    const external = externalIPv4()
    if (external !== undefined)
      expect(await reachable(`http://${external}:${port}/healthz`)).toBe(true)
    proc.child.kill('SIGTERM')
    expect(await proc.exited).toBe(0)
  })

  it('reads NATS and Postgres in the background: 200 scrapes in a row cause at most one read', async () => {
    const proc = start({ METRICS_REFRESH_SECONDS: '30' })
    const base = `http://127.0.0.1:${await metricsPort(proc)}`
    // Figures are there once the processor runs (its registration reads them once).
    await waitFor(
      'the lag figures of readings',
      async () =>
        (await metricValue(base, 'fleetstream_checkpoint_sequence')) !== undefined &&
        (await metricValue(base, 'fleetstream_lag_source_up')) === 1,
      30_000,
      proc.output,
    )
    const before = await metricValue(base, 'fleetstream_lag_refreshes_total')
    expect(before).toBeGreaterThanOrEqual(1)
    for (let i = 0; i < 10; i++) {
      // 20 at once, ten times: what a misconfigured scraper fleet would send.
      const texts = await Promise.all(
        Array.from({ length: 20 }, async () => (await fetch(`${base}/metrics`)).text()),
      )
      expect(texts.every((t) => t.includes('fleetstream_checkpoint_sequence'))).toBe(true)
    }
    const after = await metricValue(base, 'fleetstream_lag_refreshes_total')
    expect(after! - before!).toBeLessThanOrEqual(1)
    proc.child.kill('SIGTERM')
    expect(await proc.exited).toBe(0)
  })
})
