import { describe, expect, it } from 'vitest'
import { consumerLag } from '../cli/fleet-status.ts'

describe('status: what a consumer still has to hand over', () => {
  it('counts pending messages and the unacked deliveries past the checkpoint', () => {
    // a batch of 300 in the processor's hands, 50 more waiting
    expect(consumerLag({ pending: 50, ackPending: 300, deliveredSeq: 1_300 }, 1_000)).toBe(350)
    // a filtered consumer: fewer unacked than sequences between checkpoint and delivery
    expect(consumerLag({ pending: 0, ackPending: 10, deliveredSeq: 1_300 }, 1_000)).toBe(10)
  })

  it('does not count deliveries at or below the checkpoint: applied already, their ack was lost', () => {
    expect(consumerLag({ pending: 50, ackPending: 300, deliveredSeq: 1_803 }, 1_803)).toBe(50)
    expect(consumerLag({ pending: 0, ackPending: 300, deliveredSeq: 1_803 }, 1_900)).toBe(0)
    // part of the unacked window lies past the checkpoint
    expect(consumerLag({ pending: 0, ackPending: 300, deliveredSeq: 1_803 }, 1_703)).toBe(100)
  })

  it('is 0 for a processor that has no consumer yet (its checkpoint distance says the rest)', () => {
    expect(consumerLag(undefined, 0)).toBe(0)
  })
})
