import type { NatsConnection } from '@nats-io/transport-node'
import { describe, expect, it } from 'vitest'
import { createPublisher } from '../infra/publisher.ts'
import { HybridLogicalClock } from '../schemas/hlc.ts'
import { readingDraft } from './fixtures.ts'

/** The ids `stamp` gives events (from a pooled random source): UUIDv7, unique, time-ordered. */
describe('event ids', () => {
  // stamp() sends nothing: a connection that is never used is enough.
  const unused = {
    publish: () => undefined,
    subscribe: () => undefined,
  } as unknown as NatsConnection
  const publisher = createPublisher(unused, {
    clock: new HybridLogicalClock({ node: 'test', maxOffsetMs: 500 }),
  })

  it('are UUIDv7s, each different, carrying the millisecond they were made in', () => {
    const before = Date.now()
    // More ids than one refill of the random pool gives, so that refills are crossed.
    const ids = Array.from(
      { length: 20_000 },
      () => publisher.stamp(readingDraft('s-1', 20)).eventId,
    )
    const after = Date.now()
    expect(new Set(ids).size).toBe(ids.length)
    for (const id of ids) {
      expect(id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/)
      const ms = parseInt(id.replaceAll('-', '').slice(0, 12), 16)
      expect(ms).toBeGreaterThanOrEqual(before)
      expect(ms).toBeLessThanOrEqual(after)
    }
  })

  it('keep an id the caller gives', () => {
    const eventId = '0190a1b2-c3d4-7e5f-8a9b-000000000001'
    expect(publisher.stamp({ ...readingDraft('s-1', 20), eventId }).eventId).toBe(eventId)
  })
})
