import type pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { createPool } from '../infra/database.ts'
import { createLogger } from '../infra/logger.ts'
import { Lease } from '../processors/progress/locks.ts'
import { freshDatabase } from './harness/test-servers.ts'
import { waitFor } from './fixtures.ts'

/**
 * Instances of a processor tell each other when the share of slots may have changed, so a
 * hand-over does not wait for the next look round (REBALANCE_MS).
 */
describe('the lease tells the other instances when membership changes', { timeout: 60_000 }, () => {
  let pool: pg.Pool
  const open: Lease[] = []
  beforeAll(async () => {
    pool = createPool(await freshDatabase(), { log: createLogger({ level: 'silent' }) })
  })
  afterAll(async () => {
    for (const lease of open) await lease.close()
    await pool.end()
  })

  /** A lease of `processor` counting the changes it was told of. */
  async function counting(processor: string): Promise<{ lease: Lease; changes: () => number }> {
    let n = 0
    const lease = await Lease.open(
      pool,
      processor,
      () => undefined,
      () => n++,
    )
    open.push(lease)
    return { lease, changes: () => n }
  }

  it('on a join, a slot given back and a leave; never its own, never another processor’s', async () => {
    const a = await counting('readings')
    const other = await counting('alerts')
    expect(await a.lease.join()).toBe(true)
    expect(await other.lease.join()).toBe(true)

    const b = await counting('readings')
    expect(await b.lease.join()).toBe(true)
    await waitFor('a to hear of b joining', () => a.changes() === 1)
    expect(b.changes()).toBe(0) // its own join

    expect(await b.lease.tryAcquire('readings-p1')).toBe(true)
    await b.lease.release('readings-p1')
    await waitFor('a to hear of the slot given back', () => a.changes() === 2)

    await b.lease.close()
    await waitFor('a to hear of b leaving', () => a.changes() === 3)

    // A round trip on each session: anything still on its way has arrived by its answer.
    expect(await a.lease.members()).toEqual([a.lease.member])
    expect(await other.lease.members()).toEqual([other.lease.member])
    expect(a.changes()).toBe(3)
    expect(b.changes()).toBe(0)
    expect(other.changes()).toBe(0)
  })
})
