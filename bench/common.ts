/**
 * What the bench's phases share: the reading events they publish, progress notes on stderr,
 * waiting for a condition, the fleetstream CLI as a child process, and CPU and memory figures
 * read from /proc.
 */
import { FleetstreamError } from '../schemas/errors.ts'
import { spawn, type ChildProcess } from 'node:child_process'
import { readdirSync, readFileSync } from 'node:fs'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'
import type { EventDraft, Publisher } from '../infra/publisher.ts'
import type { ReadingRecorded } from '../schemas/events.ts'
import { eventSubject } from '../schemas/subjects.ts'
import { onProcessEnd } from '../testbed/reaper.ts'

export const repoRoot = fileURLToPath(new URL('../..', import.meta.url))
export const cliPath = fileURLToPath(new URL('../cli/fleetstream.js', import.meta.url))

/** A reading as fleetstream publishes it: the envelope, its subject and its JSON body. */
export interface BenchEvent {
  readonly event: ReadingRecorded
  readonly subject: string
  readonly body: string
}

/** `sensor-00001` ... like the simulator's fleet. */
export function deviceId(i: number): string {
  return `sensor-${String(i + 1).padStart(5, '0')}`
}

const METRICS = [
  { metric: 'temperature', unit: 'C', base: 21, spread: 4 },
  { metric: 'humidity', unit: '%', base: 45, spread: 10 },
] as const

/** The i-th reading across `devices` sensors, alternating metrics, values in normal ranges. */
export function readingDraft(i: number, devices: number): EventDraft<'reading.recorded'> {
  const m = METRICS[i % METRICS.length] ?? METRICS[0]
  const value = Math.round((m.base + (Math.random() - 0.5) * m.spread) * 100) / 100
  return {
    type: 'reading.recorded',
    deviceId: deviceId(i % devices),
    data: { metric: m.metric, value, unit: m.unit },
  }
}

/** The reading event `publisher.stamp()` builds for the i-th publish across `devices` sensors. */
export function stampReading(publisher: Publisher, i: number, devices: number): BenchEvent {
  const event = publisher.stamp(readingDraft(i, devices))
  return { event, subject: eventSubject(event.deviceId, event.type), body: JSON.stringify(event) }
}

/** Progress for the operator; stdout stays for the table (or the JSON). */
export function note(line: string): void {
  process.stderr.write(`bench: ${line}\n`)
}

/** Polls until `check` is true; fails naming what it waited for. */
export async function waitUntil(
  what: string,
  check: () => Promise<boolean>,
  timeoutMs: number,
  pollMs = 50,
): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!(await check())) {
    if (Date.now() > deadline) throw new BenchError(`timed out after ${timeoutMs} ms: ${what}`)
    await sleep(pollMs)
  }
}

/** The bench could not measure something; the message says what and why. */
export class BenchError extends FleetstreamError {}

/** A fleetstream CLI child process; killed with SIGKILL if the bench ends without stopping it. */
export interface Child {
  readonly name: string
  readonly pid: number
  readonly exited: Promise<number>
  running(): boolean
  /** The last 8 KB of stdout and stderr. */
  output(): string
  /** Full stdout. */
  stdout(): string
  /** SIGTERM, then SIGKILL after `graceMs`. */
  stop(graceMs?: number): Promise<number>
}

export function spawnCli(
  name: string,
  args: readonly string[],
  env: Record<string, string>,
): Child {
  // The node flags the binary's shebang gives it (cli/fleetstream.ts).
  const child: ChildProcess = spawn(
    process.execPath,
    ['--max-semi-space-size=4', cliPath, ...args],
    {
      cwd: repoRoot,
      env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '/tmp', ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  )
  let tail = ''
  let out = ''
  const keep = (d: Buffer): void => {
    tail = (tail + d.toString()).slice(-8192)
  }
  child.stdout?.on('data', (d: Buffer) => {
    out += d.toString()
    keep(d)
  })
  child.stderr?.on('data', keep)
  const forget = onProcessEnd(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
  })
  const exited = new Promise<number>((resolve) => {
    child.once('exit', (code, signal) => {
      forget()
      resolve(code ?? (signal === 'SIGKILL' ? 137 : 143))
    })
    child.once('error', (err) => {
      tail += `\nspawn error: ${err.message}`
      forget()
      resolve(127)
    })
  })
  return {
    name,
    pid: child.pid ?? -1,
    exited,
    running: () => child.exitCode === null && child.signalCode === null,
    output: () => tail,
    stdout: () => out,
    async stop(graceMs = 10_000) {
      if (child.exitCode !== null || child.signalCode !== null) return exited
      child.kill('SIGTERM')
      const timer = setTimeout(() => child.kill('SIGKILL'), graceMs)
      const code = await exited
      clearTimeout(timer)
      return code
    },
  }
}

/** Peak resident set (VmHWM) of a live process in MB, from /proc. */
export function peakRssMb(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8')
  const kb = /^VmHWM:\s+(\d+)\s+kB/m.exec(status)?.[1]
  if (kb === undefined) throw new BenchError(`no VmHWM in /proc/${pid}/status`)
  return Number(kb) / 1024
}

/** Fields of /proc/<pid>/stat after the command name (field 3 on), or undefined if it is gone. */
function statFields(pid: number): string[] | undefined {
  let stat: string
  try {
    stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
  } catch {
    return undefined
  }
  // The command name may itself hold spaces and parentheses.
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ')
}

/** CPU seconds (user + system) a live process has used, from /proc (USER_HZ is 100 on Linux). */
export function cpuSeconds(pid: number): number {
  const fields = statFields(pid)
  if (fields === undefined) throw new BenchError(`no /proc/${pid}/stat`)
  return (Number(fields[11]) + Number(fields[12])) / 100
}

/**
 * CPU seconds of a process and all its children, the live ones and the exited ones it has reaped
 * (cutime + cstime): for a Postgres cluster, the postmaster and every backend, including those of
 * connections closed in the meantime.
 */
export function treeCpuSeconds(pid: number): number {
  // A child reaped while /proc is scanned is in neither the scan nor the reaped time read before
  // it (a run's (d) lost its three backends' ~45 CPU-s that way when their connections closed
  // just before): the scan is repeated until no child was reaped during it.
  for (;;) {
    const before = ownTicks(pid)
    let children = 0
    for (const entry of readdirSync('/proc')) {
      if (!/^\d+$/.test(entry)) continue
      const f = statFields(Number(entry))
      // ppid is field 4, index 1 here.
      if (f !== undefined && Number(f[1]) === pid) children += Number(f[11]) + Number(f[12])
    }
    const after = ownTicks(pid)
    if (after.reaped === before.reaped) return (after.own + after.reaped + children) / 100
  }
}

/** A process's own CPU ticks, and those of its children it has reaped (cutime + cstime). */
function ownTicks(pid: number): { own: number; reaped: number } {
  const f = statFields(pid)
  if (f === undefined) throw new BenchError(`no /proc/${pid}/stat`)
  return { own: Number(f[11]) + Number(f[12]), reaped: Number(f[13]) + Number(f[14]) }
}

/** The parent process of `pid` (for a Postgres backend: the postmaster). */
export function parentPid(pid: number): number {
  const f = statFields(pid)
  if (f === undefined) throw new BenchError(`no /proc/${pid}/stat`)
  return Number(f[1])
}

export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return Number.NaN
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))
  return sorted[i] ?? Number.NaN
}
