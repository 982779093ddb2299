import { spawn } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Runtime } from '../app/runtime.ts'
import { widthOf } from '../cli/terminal.ts'
import { startProcessor } from '../processors/runner/runner.ts'
import type { NatsServer } from './harness/test-servers.ts'
import {
  allCaughtUp,
  cliPath,
  cliSystem,
  readingDraft,
  repoRoot,
  runCli,
  testPublisher,
} from './fixtures.ts'

/** What a person sees in a terminal this wide: every test here runs the CLI on a pty of it. */
const COLUMNS = 100

/**
 * Runs the CLI on a pseudo-terminal of {@link COLUMNS} columns (util-linux `script`), as a
 * person at a terminal runs it: stdout and stderr are the terminal.
 */
async function runInTerminal(
  args: readonly string[],
  env: Record<string, string>,
  timeoutMs = 120_000,
): Promise<{ code: number; output: string }> {
  const quote = (s: string) => `'${s.replaceAll("'", `'\\''`)}'`
  const command = `stty cols ${COLUMNS} rows 30; exec ${[process.execPath, cliPath, ...args].map(quote).join(' ')}`
  const child = spawn('script', ['-qec', command, '/dev/null'], {
    cwd: repoRoot,
    env: {
      PATH: process.env.PATH ?? '',
      HOME: process.env.HOME ?? '/tmp',
      TERM: 'xterm-256color',
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  let output = ''
  child.stdout.on('data', (d: Buffer) => (output += d.toString()))
  child.stderr.on('data', (d: Buffer) => (output += d.toString()))
  const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs)
  const code = await new Promise<number>((resolve) => {
    child.on('exit', (c) => {
      resolve(c ?? 128)
    })
  })
  clearTimeout(timer)
  return { code, output }
}

/**
 * The terminal output as the pieces drawn from the first column: split at line ends, carriage
 * returns and cursor moves (up, to a column), with colours and erasures dropped.
 */
function drawn(output: string): string[] {
  const ESC = String.fromCharCode(27)
  return (
    output
      .replace(new RegExp(`${ESC}\\[[0-9;?]*([A-Za-z])`, 'g'), (_m, op: string) =>
        'AGH'.includes(op) ? '\n' : '',
      )
      .replace(new RegExp(`${ESC}[78]`, 'g'), '')
      .split(/\r\n|\n|\r/)
      // A line a redraw leaves as it was is no line of its own.
      .filter((l) => l !== '')
  )
}

/** Lines longer than the terminal: a redraw of one of them leaves half lines behind. */
const tooWide = (lines: readonly string[]) => lines.filter((l) => widthOf(l) > COLUMNS)

const jsonLogLines = (lines: readonly string[]) => lines.filter((l) => l.includes('{"level":'))

describe('the CLI at a 100-column terminal', () => {
  let nats: NatsServer
  let rt: Runtime
  let env: Record<string, string>
  /** A device token long enough to push a dlq list row or a tail line past 100 columns. */
  const longDevice = `dev-${'x'.repeat(110)}`
  let longSeq = 0

  beforeAll(async () => {
    ;({ nats, env, rt } = await cliSystem())
    const publisher = testPublisher(rt)
    for (let i = 0; i < 30; i++) await publisher.publish(readingDraft(`dev-${i % 3}`, 20 + i))
    longSeq = (
      await rt.js.publish(`fleet.events.${longDevice}.reading`, '{"not": json', {
        msgID: 'garbage-long',
      })
    ).seq
    await rt.js.publish('fleet.events.dev-0.reading', 'garbage', { msgID: 'garbage-short' })
    // Each processor parks both: six DLQ entries.
    const running = Object.values(rt.processors).map((spec) => startProcessor(spec, rt))
    await allCaughtUp(rt, Object.keys(rt.processors))
    await Promise.all(running.map((p) => p.stop()))
  }, 120_000)
  afterAll(async () => {
    await rt.close()
    await nats.cleanup()
  })

  it('start: the live status fits the width, no half lines, no JSON logs', async () => {
    const r = await runInTerminal(
      ['start', '--duration', '2', '--devices', '5', '--rate', '50', '--seed', '1'],
      env,
    )
    expect(r.code, r.output).toBe(0)
    const lines = drawn(r.output)
    // The summary's commands are for copy and paste, whole however long; the rest fits.
    expect(tooWide(lines.filter((l) => !/^ {2}(psql|nats) /.test(l)))).toEqual([])
    expect(jsonLogLines(lines)).toEqual([])
    expect(lines.some((l) => /^published [\d,]+ events, [\d,]+ duplicates refused/.test(l))).toBe(
      true,
    )
    expect(lines.some((l) => /^ {2}readings +applied [\d,]+ +refused [\d,]+ +lag /.test(l))).toBe(
      true,
    )
  }, 180_000)

  it('start without a terminal prints plain lines: no cursor moves, no colours', async () => {
    const r = await runCli(['start', '--duration', '1', '--devices', '2', '--rate', '20'], env)
    expect(r.code, r.output).toBe(0)
    expect(r.output).not.toContain(String.fromCharCode(27))
    expect(r.output).toMatch(
      /^published [\d,]+ events, [\d,]+ duplicates refused, .* \| readings: applied/m,
    )
  }, 120_000)

  it('rebuild: the bar fits, and logs are pretty lines above it, never inside it', async () => {
    const r = await runInTerminal(['rebuild', 'readings', '--batch-size', '10'], {
      ...env,
      LOG_LEVEL: 'info',
    })
    expect(r.code, r.output).toBe(0)
    const lines = drawn(r.output)
    const bars = lines.filter((l) => l.startsWith('rebuild readings '))
    expect(bars.length).toBeGreaterThan(0)
    expect(jsonLogLines(lines)).toEqual([])
    expect(tooWide(bars)).toEqual([])
    // pino-pretty: time, level, name, message; each on a line of its own.
    const logs = lines.filter((l) => / INFO /.test(l))
    expect(
      logs.some((l) =>
        /^\[\d\d:\d\d:\d\d\.\d{3}\] INFO \(fleetstream-rebuild\): rebuilding into scratch tables/.test(
          l,
        ),
      ),
    ).toBe(true)
    expect(logs.filter((l) => !l.startsWith('['))).toEqual([])
    expect(lines.filter((l) => l.includes('rebuild readings') && l.includes('INFO'))).toEqual([])
  }, 180_000)

  it('rebuild without a terminal keeps JSON logs on stderr for collectors', async () => {
    const r = await runCli(['rebuild', 'readings', '--json'], { ...env, LOG_LEVEL: 'info' })
    expect(r.code, r.output).toBe(0)
    expect(jsonLogLines(r.output.split('\n')).length).toBeGreaterThan(0)
    expect(r.output).not.toContain(String.fromCharCode(27))
  }, 120_000)

  it('events tail: one line per event, cut to the width; --verbose shows each in full', async () => {
    const from = String(longSeq - 2)
    const r = await runInTerminal(['events', 'tail', '--from-seq', from, '--limit', '4'], env)
    expect(r.code, r.output).toBe(0)
    const lines = drawn(r.output)
    const events = lines.filter((l) =>
      /^ +\d+ {2}\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} {2}/.test(l),
    )
    expect(events).toHaveLength(4)
    expect(tooWide(lines)).toEqual([])
    expect(events.some((l) => l.includes(`fleet.events.dev-xxx`) && l.endsWith('…'))).toBe(true)
    expect(
      events.some((l) =>
        /dev-\d {2}reading\.recorded {2}metric=temperature value=\d+ unit=C$/.test(l),
      ),
    ).toBe(true)

    const verbose = await runCli(
      ['events', 'tail', '--last', '2', '--limit', '2', '--verbose'],
      env,
    )
    expect(verbose.code, verbose.output).toBe(0)
    expect(verbose.output.match(/^seq: {9}\d+ \(stored /gm)).toHaveLength(2)
  }, 60_000)

  it('dlq list: columns line up, long subjects and details cut to the width', async () => {
    const r = await runInTerminal(['dlq', 'list'], env)
    expect(r.code, r.output).toBe(0)
    const lines = drawn(r.output)
    expect(lines[0]).toBe('FLEET_DLQ: 6 parked (alerts 2, readings 2, sensor-status 2)')
    const header = lines[1] ?? ''
    expect(header).toMatch(/^SEQ {2}PARKED \(UTC\) +PROCESSOR +REASON +ORIGIN +DETAIL$/)
    const rows = lines.slice(2)
    expect(rows).toHaveLength(6)
    expect(tooWide(lines)).toEqual([])
    // Each column starts where its heading does, on every row.
    for (const [heading, value] of [
      ['PROCESSOR', /^(alerts|readings|sensor-status) /],
      ['REASON', /^invalid-json /],
      ['ORIGIN', /^fleet\.events\.dev-/],
      ['DETAIL', /^\S/],
    ] as const) {
      const at = header.indexOf(heading)
      for (const row of rows) expect(row.slice(at), `${heading} in ${row}`).toMatch(value)
    }
    expect(rows.filter((row) => row.includes('dev-xxx')).every((row) => row.includes('…'))).toBe(
      true,
    )
  }, 60_000)

  it('a usage error prints the one problem and where to read more, exit 2', async () => {
    const cases: [string[], string][] = [
      [
        ['dlq', 'list', '--bogus'],
        "fleetstream: unknown option '--bogus'\n(see 'fleetstream dlq list --help')",
      ],
      [['nope'], "fleetstream: unknown command 'nope'\n(see 'fleetstream --help')"],
      [
        ['devices', 'add'],
        "fleetstream: missing required argument 'deviceId'\n(see 'fleetstream devices add --help')",
      ],
      [
        ['dlq', 'redrive'],
        "fleetstream: give exactly one of '--seq <n...>' and '--all'\n(see 'fleetstream dlq redrive --help')",
      ],
    ]
    for (const [args, message] of cases) {
      const r = await runCli(args, env)
      expect(r.code, `${args.join(' ')}: ${r.output}`).toBe(2)
      expect(r.output.trim(), args.join(' ')).toBe(message)
    }
  })

  it('--version prints the version in package.json', async () => {
    const { version } = JSON.parse(readFileSync(`${repoRoot}/package.json`, 'utf8')) as {
      version: string
    }
    const r = await runCli(['--version'], env)
    expect(r.code, r.output).toBe(0)
    expect(r.output.trim()).toBe(version)
  })

  it('dlq redrive --all: a bar with the count on a terminal, the final count always', async () => {
    const bar = await runInTerminal(
      ['dlq', 'redrive', '--all', '--processor', 'alerts', '--rate', '20'],
      env,
    )
    expect(bar.code, bar.output).toBe(0)
    const lines = drawn(bar.output)
    expect(lines.some((l) => /^redrive \[[#.]+\] +\d+% {2}[0-2]\/2 events/.test(l))).toBe(true)
    expect(lines.some((l) => /^redrive \[#+\] 100% {2}2\/2 events/.test(l))).toBe(true)
    expect(lines).toContain('redriven 2 events; 4 left in FLEET_DLQ')
    expect(tooWide(lines)).toEqual([])

    const plain = await runCli(['dlq', 'redrive', '--all', '--processor', 'readings'], env)
    expect(plain.code, plain.output).toBe(0)
    expect(plain.output).toBe('redriven 2 events; 2 left in FLEET_DLQ\n')
  }, 60_000)
})
