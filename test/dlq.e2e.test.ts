import { headers } from '@nats-io/transport-node'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { DeadLetterEntry } from '../processors/dlq/inspect.ts'
import type { Runtime } from '../app/runtime.ts'
import { startProcessor } from '../processors/runner/runner.ts'
import { type RunningProcessor } from '../processors/runner/types.ts'
import { readingsProcessor } from '../processors/readings-processor.ts'
import type { NatsServer } from './harness/test-servers.ts'
import {
  allCaughtUp,
  buggyReadings,
  cliSystem,
  readingDraft,
  runCli,
  testPublisher,
  waitFor,
} from './fixtures.ts'

describe('dlq list, show and redrive', () => {
  let nats: NatsServer
  let rt: Runtime
  let env: Record<string, string>
  let readings: RunningProcessor
  let status: RunningProcessor
  beforeAll(async () => {
    ;({ nats, env, rt } = await cliSystem())
    readings = startProcessor(buggyReadings, rt)
    status = startProcessor(rt.processors['sensor-status'], rt)

    const publisher = testPublisher(rt)
    for (let i = 0; i < 20; i++)
      await publisher.publish(readingDraft(`d-${i % 5}`, i % 7 === 3 ? 666 : i))
    const h = headers()
    h.set('Fleet-Hlc', '1795000000000-000000-gw')
    await rt.js.publish('fleet.events.d-9.reading', '{"not": json', {
      msgID: 'garbage-1',
      headers: h,
    })
    await allCaughtUp(rt, ['readings', 'sensor-status'])
  })
  afterAll(async () => {
    await readings.stop()
    await status.stop()
    await rt.close()
    await nats.cleanup()
  })

  const cli = (...args: string[]) => runCli(['dlq', ...args], env)

  it('lists what was parked, by whom and why, with the depth per processor', async () => {
    const json = await cli('list', '--json')
    expect(json.code, json.output).toBe(0)
    // Two processors park concurrently: compare by processor, then original sequence.
    const entries = (JSON.parse(json.output) as DeadLetterEntry[]).sort(
      (a, b) => a.processor.localeCompare(b.processor) || a.streamSeq - b.streamSeq,
    )
    expect(entries.map((e) => [e.processor, e.reason])).toEqual([
      ['readings', 'handler-failed'],
      ['readings', 'handler-failed'],
      ['readings', 'handler-failed'],
      ['readings', 'invalid-json'],
      ['sensor-status', 'invalid-json'],
    ])
    expect(entries[0]).toMatchObject({
      attempts: 3,
      subject: 'fleet.events.d-3.reading',
      stream: 'FLEET_EVENTS',
    })
    expect(entries[0]?.detail).toContain('RangeError: 666 is not a temperature')

    const text = await cli('list')
    expect(text.output.split('\n')[0]).toBe('FLEET_DLQ: 5 parked (readings 4, sensor-status 1)')
  })

  it('shows one entry with its origin, original headers and body', async () => {
    const first = (JSON.parse((await cli('list', '--json')).output) as DeadLetterEntry[]).find(
      (e) => e.reason === 'handler-failed',
    )
    const shown = await cli('show', String(first!.seq))
    expect(shown.code).toBe(0)
    expect(shown.output).toContain('reason:     handler-failed')
    expect(shown.output).toContain(
      `origin:     FLEET_EVENTS #${first!.streamSeq} on ${first!.subject}`,
    )
    expect(shown.output).toMatch(/ {2}Nats-Msg-Id: [0-9a-f-]{36}/)
    expect(shown.output).toContain('"value": 666')
    const missing = await cli('show', '999')
    expect(missing.code).toBe(2)
    expect(missing.output).toContain("'seq' must be the sequence of an entry in FLEET_DLQ, got 999")
    expect((await cli('redrive')).output).toContain(
      "give exactly one of '--seq <n...>' and '--all'",
    )
  })

  it('after the fix, a redrive applies the events for the processor that failed only, at the rate asked', async () => {
    await readings.stop()
    readings = startProcessor(readingsProcessor, rt) // the fixed deployment
    const statusApplied = status.stats.applied

    const started = Date.now()
    const r = await cli('redrive', '--all', '--processor', 'readings', '--rate', '5')
    expect(r.code, r.output).toBe(0)
    expect(Date.now() - started).toBeGreaterThanOrEqual(600) // 4 events at 5/s: three gaps of 200 ms
    // (the garbage may already be parked again by the time the summary counts what is left)
    expect(r.output).toMatch(/redriven 4 events; [12] left in FLEET_DLQ/)
    await allCaughtUp(rt, ['readings', 'sensor-status'])

    const values = await rt.db
      .selectFrom('readings')
      .select('value')
      .where('value', '=', 666)
      .execute()
    expect(values).toHaveLength(3)
    // sensor-status saw the copies and applied none of them
    expect(status.stats.applied).toBe(statusApplied)
    // the garbage is still garbage: readings parks its copy again
    await waitFor('the garbage to be parked again', async () => {
      const left = JSON.parse((await cli('list', '--json')).output) as DeadLetterEntry[]
      return left.length === 2
    })
    const left = JSON.parse((await cli('list', '--json')).output) as DeadLetterEntry[]
    expect(left.map((e) => [e.processor, e.reason]).sort()).toEqual([
      ['readings', 'invalid-json'],
      ['sensor-status', 'invalid-json'],
    ])
  })
})
