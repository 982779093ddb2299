/**
 * What the parts of a running processor share: {@link RunnerContext} per instance (built by
 * runner.ts) and {@link SlotState} per slot session (built by slot-session.ts, read and moved by
 * pipeline.ts, commit.ts and stream-watch.ts).
 */
import type { JetStreamClient, JsMsg } from '@nats-io/jetstream'
import type { Breaker } from '../../infra/failures.ts'
import type { Logger } from '../../infra/logger.ts'
import type { Slot } from '../partitions.ts'
import type { CheckpointPosition } from '../progress/checkpoints.ts'
import type { ConsumerSpec, MessageBuffer } from './consumer.ts'
import type { ProcessorCounters } from './counters.ts'
import type { ProcessorDeps, ProcessorSpec } from './types.ts'

/** What the slot sessions of one processor instance share. */
export interface RunnerContext {
  readonly spec: ProcessorSpec
  readonly deps: ProcessorDeps
  readonly log: Logger
  readonly js: JetStreamClient
  readonly postgres: Breaker
  readonly counters: ProcessorCounters
  /** Events parked for handler failures since the last successful commit of any event. */
  readonly poison: { get(): number; set(n: number): void }
  /** How often the NATS connection has come back so far. */
  readonly reconnects: () => number
}

/** One slot session's state, shared by its stages and its stream watch. */
export interface SlotState {
  readonly slot: Slot
  readonly ctx: RunnerContext
  readonly log: Logger
  readonly consumer: ConsumerSpec
  readonly buffer: MessageBuffer
  /** Aborted by the instance's stop, or when this slot is handed to another instance. */
  readonly stop: AbortSignal
  /** The checkpoint as this session last committed (or rewound) it. */
  position: CheckpointPosition
  /** The highest stream sequence delivered in this session. */
  delivered: number
  /** The newest delivery of this session. */
  newest: JsMsg | undefined
  /** The consumer's delivery sequence acked up to (AckPolicy.All): all before it are acked. */
  ackedDelivery: number
  /** Set when the stream no longer holds what was applied: the session ends and re-anchors. */
  diverged: Error | undefined
  /** Runs `fn` when the batch or stream check before it has finished (a check may move the checkpoint back). */
  exclusive<T>(fn: () => Promise<T>): Promise<T>
}

/** Read through a call: TypeScript would otherwise keep a narrowing from an earlier check. */
export function isAborted(signal: AbortSignal): boolean {
  return signal.aborted
}
