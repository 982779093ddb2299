import { describe, expect, it } from 'vitest'
import { HeldInputs } from '../projections/held-inputs.ts'
import type { AlertInputTable } from '../projections/tables.ts'

function reading(
  device: string,
  rule: string,
  event: string,
  hlc: string,
  value: number,
  correlation = event,
): AlertInputTable {
  return {
    device_id: device,
    rule_id: rule,
    event_id: event,
    kind: 'reading',
    hlc,
    correlation_id: correlation,
    value,
    alert_id: null,
    acknowledged_by: null,
  }
}

const HLC_A = '1795428000000-000001-gw-a'
const HLC_B = '1795428000001-000000-gw-b'

describe('HeldInputs', () => {
  it('gives back each sensor its inputs as added, each (rule, event) once', () => {
    const held = new HeldInputs()
    const added = [
      // one event feeding two rules, then one with its own correlation id
      reading('s-1', 'temperature-high', 'e-1', HLC_A, 41.5),
      reading('s-1', 'temperature-low', 'e-1', HLC_A, 41.5),
      reading('s-2', 'humidity-high', 'e-2', HLC_B, 91, 'chain-9'),
      // e-1 again (published again outside the dedup window): the first copy stays
      reading('s-1', 'temperature-high', 'e-1', HLC_A, 41.5),
    ]
    const ack: AlertInputTable = {
      ...reading('s-2', '', 'e-3', HLC_B, 0),
      kind: 'ack',
      value: null,
      alert_id: 'alert-1',
      acknowledged_by: 'operator',
    }
    for (const i of [...added, ack, ack]) held.add(i)

    const out = held.of(['s-1', 's-2', 's-3'])
    expect(out.get('s-1')).toEqual([added[0], added[1]])
    expect(out.get('s-2')).toEqual([added[2], ack])
    expect(out.get('s-3')).toEqual([])
  })

  it('keeps apart two events next to each other that share an id', () => {
    // Another device reusing an event id: its own HLC, value and correlation id stay its own.
    const held = new HeldInputs()
    const mine = reading('s-1', 'temperature-high', 'e-1', HLC_A, 20)
    const theirs = reading('s-9', 'temperature-high', 'e-1', HLC_B, 50, 'chain-x')
    held.add(mine)
    held.add(theirs)
    const out = held.of(['s-1', 's-9'])
    expect(out.get('s-1')).toEqual([mine])
    expect(out.get('s-9')).toEqual([theirs])
  })

  it('counts what it holds', () => {
    const held = new HeldInputs()
    for (let n = 0; n < 5000; n++)
      held.add(reading(`s-${n % 7}`, 'temperature-high', `e-${n}`, HLC_A, n))
    expect(held.size).toBe(5000)
    // ~60 bytes an input: typed-array slots and the event's text
    expect(held.bytes).toBeGreaterThan(5000 * 20)
    expect(held.bytes).toBeLessThan(5000 * 80)
    const all = held.of(Array.from({ length: 7 }, (_, d) => `s-${d}`))
    let count = 0
    for (const list of all.values()) count += list.length
    expect(count).toBe(5000)
    expect(all.get('s-3')?.[0]).toEqual(reading('s-3', 'temperature-high', 'e-3', HLC_A, 3))
  })
})
