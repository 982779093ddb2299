import type { AlertInputTable } from './tables.ts'

/**
 * Alert inputs a rebuild's bulk load holds until its flush (projections/alerts-bulk-load.ts),
 * outside the JavaScript heap: per input a few typed-array slots, and its event's id, HLC and
 * correlation id once per event in one byte buffer (the inputs an event feeds several rules
 * share them). About 60 bytes an input, where an object with its own strings took ~210 and was
 * scanned by every full garbage collection: 1.5M inputs held 320 MB of heap.
 *
 * Acknowledgements (operator actions: few) are kept as the objects they are.
 *
 * ```ts
 * const held = new HeldInputs()
 * for (const i of inputsOf(rules, event)) held.add(i)
 * const mine = held.of(['sensor-00001']).get('sensor-00001') // each (rule, event) once
 * ```
 */
export class HeldInputs {
  readonly #devices: string[] = []
  readonly #deviceIndex = new Map<string, number>()
  readonly #rules: string[] = []
  readonly #ruleIndex = new Map<string, number>()
  /** `<event id>\0<hlc>\0<correlation id, or nothing when it is the event id>` per event. */
  #text = Buffer.allocUnsafe(1 << 16)
  #textLength = 0
  #device = new Uint32Array(1024)
  #rule = new Uint16Array(1024)
  #at = new Uint32Array(1024)
  #length = new Uint16Array(1024)
  #value = new Float64Array(1024)
  #count = 0
  /** The input whose text was written last: the next one of the same event reuses it. */
  #last: AlertInputTable | undefined
  #acks: AlertInputTable[] = []
  /** Per device index: where its inputs start in {@link #order} (built once, by `of`). */
  #starts: Uint32Array | undefined
  #order: Uint32Array | undefined

  /** Bytes held, roughly. */
  get bytes(): number {
    return this.#textLength + this.#count * 20 + this.#acks.length * 300
  }

  get size(): number {
    return this.#count + this.#acks.length
  }

  add(i: AlertInputTable): void {
    if (this.#order !== undefined) throw new Error('HeldInputs: add after of()')
    if (i.kind === 'ack') {
      this.#acks.push(i)
      return
    }
    if (this.#count === this.#device.length) this.#grow()
    const n = this.#count++
    this.#device[n] = indexOf(this.#deviceIndex, this.#devices, i.device_id)
    this.#rule[n] = indexOf(this.#ruleIndex, this.#rules, i.rule_id)
    this.#value[n] = i.value ?? Number.NaN
    const last = this.#last
    // The same event: its id, and (an id another event reused) its HLC and correlation id too.
    if (
      last === undefined ||
      i.event_id !== last.event_id ||
      i.hlc !== last.hlc ||
      i.correlation_id !== last.correlation_id
    ) {
      const text = `${i.event_id}\u0000${i.hlc}\u0000${i.correlation_id === i.event_id ? '' : i.correlation_id}`
      // Ids and HLCs are ASCII (their patterns): one byte a character.
      while (this.#textLength + text.length > this.#text.length) {
        const bigger = Buffer.allocUnsafe(this.#text.length * 2)
        this.#text.copy(bigger, 0, 0, this.#textLength)
        this.#text = bigger
      }
      this.#text.write(text, this.#textLength, 'latin1')
      this.#last = i
      this.#at[n] = this.#textLength
      this.#length[n] = text.length
      this.#textLength += text.length
    } else {
      this.#at[n] = this.#at[n - 1] ?? 0
      this.#length[n] = this.#length[n - 1] ?? 0
    }
  }

  /**
   * The inputs of `deviceIds`, by device, in the order they were added, each (rule, event) once:
   * its first copy, as the live insert's `on conflict do nothing` keeps (an event published again
   * outside the dedup window).
   */
  of(deviceIds: readonly string[]): Map<string, AlertInputTable[]> {
    const { starts, order } = this.#byDevice()
    const out = new Map<string, AlertInputTable[]>()
    for (const deviceId of deviceIds) {
      const d = this.#deviceIndex.get(deviceId)
      const list: AlertInputTable[] = []
      const seen = new Set<string>()
      if (d !== undefined) {
        for (let k = starts[d] ?? 0; k < (starts[d + 1] ?? 0); k++) {
          const i = this.#input(order[k] ?? 0, deviceId)
          const key = `${i.rule_id}\u0000${i.event_id}`
          if (seen.has(key)) continue
          seen.add(key)
          list.push(i)
        }
      }
      out.set(deviceId, list)
    }
    for (const a of this.#acks) {
      const list = out.get(a.device_id)
      if (list === undefined) continue
      if (list.some((i) => i.kind === 'ack' && i.event_id === a.event_id)) continue
      list.push(a)
    }
    return out
  }

  #input(n: number, deviceId: string): AlertInputTable {
    const at = this.#at[n] ?? 0
    const [eventId = '', hlc = '', correlationId = ''] = this.#text
      .toString('latin1', at, at + (this.#length[n] ?? 0))
      .split('\u0000')
    const value = this.#value[n] ?? Number.NaN
    return {
      device_id: deviceId,
      rule_id: this.#rules[this.#rule[n] ?? 0] ?? '',
      event_id: eventId,
      kind: 'reading',
      hlc,
      correlation_id: correlationId === '' ? eventId : correlationId,
      value: Number.isNaN(value) ? null : value,
      alert_id: null,
      acknowledged_by: null,
    }
  }

  /** Input numbers ordered by device (a counting sort, stable: each device's in added order). */
  #byDevice(): { starts: Uint32Array; order: Uint32Array } {
    if (this.#starts !== undefined && this.#order !== undefined)
      return { starts: this.#starts, order: this.#order }
    const starts = new Uint32Array(this.#devices.length + 1)
    for (let n = 0; n < this.#count; n++) {
      const d = (this.#device[n] ?? 0) + 1
      starts[d] = (starts[d] ?? 0) + 1
    }
    for (let d = 1; d < starts.length; d++) starts[d] = (starts[d] ?? 0) + (starts[d - 1] ?? 0)
    const next = starts.slice()
    const order = new Uint32Array(this.#count)
    for (let n = 0; n < this.#count; n++) {
      const d = this.#device[n] ?? 0
      order[next[d] ?? 0] = n
      next[d] = (next[d] ?? 0) + 1
    }
    this.#starts = starts
    this.#order = order
    return { starts, order }
  }

  #grow(): void {
    const size = this.#device.length * 2
    const grown = <T extends Uint32Array | Uint16Array | Float64Array>(a: T, b: T): T => {
      b.set(a)
      return b
    }
    this.#device = grown(this.#device, new Uint32Array(size))
    this.#rule = grown(this.#rule, new Uint16Array(size))
    this.#at = grown(this.#at, new Uint32Array(size))
    this.#length = grown(this.#length, new Uint16Array(size))
    this.#value = grown(this.#value, new Float64Array(size))
  }
}

function indexOf(index: Map<string, number>, values: string[], v: string): number {
  let n = index.get(v)
  if (n === undefined) {
    n = values.length
    values.push(v)
    index.set(v, n)
  }
  return n
}
