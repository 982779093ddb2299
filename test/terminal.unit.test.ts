import { describe, expect, it } from 'vitest'
import type { DeadLetterEntry } from '../processors/dlq/inspect.ts'
import { formatDlqTable } from '../cli/dlq-table.ts'
import { cell, fit, printable, widthOf } from '../cli/terminal.ts'

describe('fitting text to a terminal', () => {
  it('cuts to the width with an ellipsis, counting wide characters as two columns', () => {
    expect(fit('abcdef', 4)).toBe('abc…')
    expect(fit('abcd', 4)).toBe('abcd')
    expect(fit('abcdef', undefined)).toBe('abcdef')
    expect(widthOf('温度センサー')).toBe(12)
    expect(fit('温度センサー', 7)).toBe('温度セ…')
    expect(widthOf(fit('温度センサー', 7))).toBeLessThanOrEqual(7)
    expect(cell('温度', 6)).toBe('温度  ')
  })

  it('escapes control characters, so that stored text cannot drive the terminal', () => {
    expect(printable('a\u001b[2Jb\r\n')).toBe('a\\u001b[2Jb\\u000d\\u000a')
  })
})

describe('dlq list table', () => {
  const entry = (over: Partial<DeadLetterEntry>): DeadLetterEntry => ({
    seq: 1,
    processor: 'readings',
    reason: 'invalid-json',
    detail: 'body is not JSON',
    attempts: 1,
    deliveries: 1,
    subject: 'fleet.events.dev-1.reading',
    stream: 'FLEET_EVENTS',
    streamSeq: 12,
    parkedAt: '2026-11-23T10:00:00.000Z',
    key: 'k',
    headers: {},
    body: '',
    ...over,
  })

  it('aligns every column under its heading, whatever the values, within the width', () => {
    const rows = formatDlqTable(
      [
        entry({}),
        entry({ seq: 1234, processor: 'sensor-status', reason: 'handler-failed' }),
        entry({ subject: `fleet.events.${'x'.repeat(200)}.reading`, detail: '温度'.repeat(80) }),
        entry({ reason: 'r'.repeat(60), detail: 'line\nbreak' }),
      ],
      100,
    )
    const [header, ...body] = rows
    for (const row of rows) expect(widthOf(row)).toBeLessThanOrEqual(100)
    for (const heading of ['PROCESSOR', 'REASON', 'ORIGIN', 'DETAIL']) {
      const at = header!.indexOf(heading)
      for (const row of body) {
        expect(row[at - 1], `${heading}: ${row}`).toBe(' ')
        expect(row[at], `${heading}: ${row}`).not.toBe(' ')
      }
    }
    expect(body[3]).toContain('line\\u00') // escaped, not a line break
  })
})
