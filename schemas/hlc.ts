/**
 * Hybrid logical clock (Kulkarni et al., "Logical Physical Clocks", 2014).
 *
 * A timestamp is physical milliseconds + a logical counter + the id of the node that made it.
 * Its string form sorts exactly like the clock:
 *
 * ```ts
 * encodeHlc({ wallMs: 1763895201123, logical: 7, node: 'gw-1' }) // '1763895201123-000007-gw-1'
 * ```
 *
 * Store it with `COLLATE "C"` in Postgres: locale collations ignore '-' and break the order.
 */

import { BadInputError } from './errors.ts'

/** Decoded HLC timestamp. */
export interface Hlc {
  readonly wallMs: number
  readonly logical: number
  readonly node: string
}

const WALL_DIGITS = 13
const LOGICAL_DIGITS = 6
/** Largest wall time the fixed-width encoding holds (year 2286). */
export const MAX_WALL_MS = 10 ** WALL_DIGITS - 1
/** Largest logical counter; one more carries into the wall time (see {@link HybridLogicalClock}). */
export const MAX_LOGICAL = 10 ** LOGICAL_DIGITS - 1

/** Node ids are subject-token safe, like device ids. */
export const HLC_NODE_PATTERN = /^[a-z0-9-]{1,64}$/
/** The encoded form: 13-digit wall ms, 6-digit counter, node id. */
export const HLC_PATTERN = /^\d{13}-\d{6}-[a-z0-9-]{1,64}$/

/** An HLC string or value that does not follow the encoding. */
export class HlcFormatError extends BadInputError {}

/**
 * A remote timestamp more than the allowed offset ahead of local physical time. The clock was
 * not moved (CockroachDB's rule: a node never adopts a time it cannot vouch for).
 */
export class ClockSkewError extends BadInputError {
  constructor(
    readonly remote: Hlc,
    readonly referenceMs: number,
    readonly maxOffsetMs: number,
  ) {
    super(
      `HLC '${encodeHlc(remote)}' is ${remote.wallMs - referenceMs} ms ahead of the reference ` +
        `clock, more than the max offset of ${maxOffsetMs} ms`,
    )
  }
}

/**
 * A remote timestamp more than the allowed age behind the reference clock: older than any device
 * is expected to hold an event while offline (an HLC of 0, one from 2001).
 */
export class ClockAgeError extends BadInputError {
  constructor(
    readonly remote: Hlc,
    readonly referenceMs: number,
    readonly maxAgeMs: number,
  ) {
    super(
      `HLC '${encodeHlc(remote)}' is ${referenceMs - remote.wallMs} ms behind the reference ` +
        `clock, more than the max age of ${maxAgeMs} ms`,
    )
  }
}

export function encodeHlc(h: Hlc): string {
  if (!Number.isSafeInteger(h.wallMs) || h.wallMs < 0 || h.wallMs > MAX_WALL_MS) {
    throw new HlcFormatError(`'wallMs' must be an integer in [0, ${MAX_WALL_MS}], got ${h.wallMs}`)
  }
  if (!Number.isSafeInteger(h.logical) || h.logical < 0 || h.logical > MAX_LOGICAL) {
    throw new HlcFormatError(
      `'logical' must be an integer in [0, ${MAX_LOGICAL}], got ${h.logical}`,
    )
  }
  if (!HLC_NODE_PATTERN.test(h.node)) {
    throw new HlcFormatError(`'node' must match ${HLC_NODE_PATTERN}, got '${h.node}'`)
  }
  return (
    String(h.wallMs).padStart(WALL_DIGITS, '0') +
    '-' +
    String(h.logical).padStart(LOGICAL_DIGITS, '0') +
    '-' +
    h.node
  )
}

export function decodeHlc(s: string): Hlc {
  checkHlc(s)
  return {
    wallMs: Number(s.slice(0, WALL_DIGITS)),
    logical: Number(s.slice(WALL_DIGITS + 1, WALL_DIGITS + 1 + LOGICAL_DIGITS)),
    node: s.slice(WALL_DIGITS + LOGICAL_DIGITS + 2),
  }
}

/**
 * The wall clock of an encoded HLC (its first 13 digits) without decoding the rest; `NaN` when
 * they are not digits. For a hot path that only compares times: {@link decodeHlc} checks the
 * whole format and builds an object and three strings.
 */
export function hlcWallMs(s: string): number {
  if (s.length <= WALL_DIGITS) return Number.NaN
  let ms = 0
  for (let i = 0; i < WALL_DIGITS; i++) {
    const d = s.charCodeAt(i) - 48
    if (d < 0 || d > 9) return Number.NaN
    ms = ms * 10 + d
  }
  return ms
}

/** {@link hlcWallMs} of a checked HLC: throws {@link HlcFormatError} as {@link decodeHlc} does. */
export function checkedHlcWallMs(s: string): number {
  checkHlc(s)
  return hlcWallMs(s)
}

function checkHlc(s: string): void {
  if (!HLC_PATTERN.test(s)) {
    throw new HlcFormatError(`HLC must match ${HLC_PATTERN}, got '${s}'`)
  }
}

/** Clock order; node id breaks ties. Agrees with comparing the encoded strings. */
export function compareHlc(a: Hlc, b: Hlc): number {
  if (a.wallMs !== b.wallMs) return a.wallMs < b.wallMs ? -1 : 1
  if (a.logical !== b.logical) return a.logical < b.logical ? -1 : 1
  return a.node === b.node ? 0 : a.node < b.node ? -1 : 1
}

/**
 * Throws {@link ClockSkewError} when `remote` is more than `maxOffsetMs` ahead of `referenceMs`.
 * Processors pass the stream's append time as the reference, so a replay decides the same way.
 */
export function assertWithinOffset(remote: Hlc, referenceMs: number, maxOffsetMs: number): void {
  if (remote.wallMs - referenceMs > maxOffsetMs) {
    throw new ClockSkewError(remote, referenceMs, maxOffsetMs)
  }
}

/**
 * Throws {@link ClockAgeError} when `remote` is more than `maxAgeMs` behind `referenceMs`. The
 * bound is far wider than the max offset ahead: a device that buffers while offline (see
 * simulator/fleet.ts) publishes what it held, stamped when it happened, after it reconnects.
 */
export function assertWithinAge(remote: Hlc, referenceMs: number, maxAgeMs: number): void {
  if (referenceMs - remote.wallMs > maxAgeMs) {
    throw new ClockAgeError(remote, referenceMs, maxAgeMs)
  }
}

export interface HybridLogicalClockOptions {
  /** This node's id, part of every timestamp it makes. */
  readonly node: string
  /** How far ahead of local physical time a remote timestamp may be. */
  readonly maxOffsetMs: number
  /** Physical time source; tests pass a fake one. */
  readonly physicalNow?: () => number
  /** High-water timestamp restored from durable state, so a restart never goes back in time. */
  readonly last?: Hlc | string
}

/**
 * A hybrid logical clock for one node.
 *
 * ```ts
 * const clock = new HybridLogicalClock({ node: 'gw-1', maxOffsetMs: 500 })
 * const sent = clock.now()          // local or send event
 * clock.receive(decodeHlc(remote))  // merge a remote timestamp (throws ClockSkewError if too far ahead)
 * ```
 *
 * Monotonic even when the physical clock steps back. The logical counter is fixed-width; in the
 * practically unreachable case that it overflows within one millisecond, it carries into the
 * wall time (1 ms ahead of physical time), which keeps order and the encoding intact.
 */
export class HybridLogicalClock {
  readonly node: string
  readonly maxOffsetMs: number
  readonly #physicalNow: () => number
  #wallMs: number
  #logical: number

  constructor(opts: HybridLogicalClockOptions) {
    if (!HLC_NODE_PATTERN.test(opts.node)) {
      throw new HlcFormatError(`'node' must match ${HLC_NODE_PATTERN}, got '${opts.node}'`)
    }
    if (!Number.isFinite(opts.maxOffsetMs) || opts.maxOffsetMs < 0) {
      throw new HlcFormatError(`'maxOffsetMs' must be a number >= 0, got ${opts.maxOffsetMs}`)
    }
    this.node = opts.node
    this.maxOffsetMs = opts.maxOffsetMs
    this.#physicalNow = opts.physicalNow ?? Date.now
    const last = typeof opts.last === 'string' ? decodeHlc(opts.last) : opts.last
    this.#wallMs = last?.wallMs ?? 0
    this.#logical = last?.logical ?? 0
  }

  /** The last timestamp this clock issued or adopted. */
  get last(): Hlc {
    return { wallMs: this.#wallMs, logical: this.#logical, node: this.node }
  }

  /** A timestamp for a local or send event, later than every one before it. */
  now(): Hlc {
    const pt = this.#physicalNow()
    if (pt > this.#wallMs) {
      this.#set(pt, 0)
    } else {
      this.#set(this.#wallMs, this.#logical + 1)
    }
    return this.last
  }

  /**
   * Merge a remote timestamp (receive rule of the HLC paper) and return a timestamp later than
   * both it and everything this clock issued. A remote time more than `maxOffsetMs` ahead of the
   * physical clock throws {@link ClockSkewError} and leaves the clock untouched.
   */
  receive(remote: Hlc): Hlc {
    const pt = this.#physicalNow()
    assertWithinOffset(remote, pt, this.maxOffsetMs)
    const l = this.#wallMs
    const c = this.#logical
    const wall = Math.max(l, remote.wallMs, pt)
    if (wall === l && wall === remote.wallMs) {
      this.#set(wall, Math.max(c, remote.logical) + 1)
    } else if (wall === l) {
      this.#set(wall, c + 1)
    } else if (wall === remote.wallMs) {
      this.#set(wall, remote.logical + 1)
    } else {
      this.#set(wall, 0)
    }
    return this.last
  }

  #set(wallMs: number, logical: number): void {
    if (logical > MAX_LOGICAL) {
      this.#wallMs = wallMs + 1
      this.#logical = 0
    } else {
      this.#wallMs = wallMs
      this.#logical = logical
    }
  }
}
