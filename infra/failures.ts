import { TransientError } from '../schemas/errors.ts'
import {
  BrokenCircuitError,
  circuitBreaker,
  CircuitState,
  ConsecutiveBreaker,
  ExponentialBackoff,
  handleWhen,
  type CircuitBreakerPolicy,
} from 'cockatiel'
import { JetStreamApiError } from '@nats-io/jetstream'
import { PermissionViolationError, RequestError } from '@nats-io/transport-node'
import type { Logger } from './logger.ts'
import { errorSummary } from './retry.ts'

/**
 * A failure a retry can fix: the dependency is unreachable, restarting or overloaded, or the
 * transaction lost a race. Everything else (bad data, a handler bug on one event) is
 * deterministic: retrying the same input fails the same way.
 *
 * NATS: timeouts and "no responders" while a leader is elected. SQLSTATE classes: 08 connection, 40 transaction rollback (serialization, deadlock), 53
 * insufficient resources, 57 operator intervention (shutdown, starting up), 58 system error;
 * 55P03 lock not available. Class 42 (an undefined table, say) is a broken deployment, not a bad
 * event: it is transient too, so that no event is parked for it.
 */
export function isTransient(err: unknown): boolean {
  if (typeof err !== 'object' || err === null) return false
  const code = (err as { code?: unknown }).code
  if (typeof code === 'string') {
    if (/^(08|40|53|57|58|42)/.test(code) || code === '55P03') return true
    if (/^E[A-Z]+$/.test(code)) return true // ECONNREFUSED, ECONNRESET, ETIMEDOUT, EPIPE, ...
  }
  const message = err instanceof Error ? err.message : ''
  if (
    /Connection terminated|connection timeout|timeout exceeded when trying to connect|Client has encountered a connection error/i.test(
      message,
    )
  ) {
    return true
  }
  if (isJetStreamUnavailable(err)) return true
  // An open breaker is the outage itself (cockatiel's error keeps the name 'Error').
  if (err instanceof BrokenCircuitError) return true
  // Ours, e.g. waiting for an operator's `fleetstream setup` (see infra/streams.ts).
  if (err instanceof TransientError) return true
  const cause = (err as { cause?: unknown }).cause
  return cause !== undefined && cause !== err && isTransient(cause)
}

/**
 * Postgres refused the values of the statement: the event's fault, not the projection's. Retrying
 * the same values fails the same way, and another event goes through, so it is parked at once and
 * never counts toward the broken-projection guard.
 *
 * SQLSTATE classes: 22 data exception (a value out of range, an invalid byte, a bad date), 23
 * integrity constraint violation (a CHECK the value breaks), 54 program limit exceeded (a value
 * too large for an index row). Not 23502 (not-null violation): schema-valid events carry every
 * value a NOT NULL column needs, so that one is the projection's bug.
 *
 * ```ts
 * isDataError({ code: '22021' }) // true: invalid byte sequence (U+0000)
 * isDataError({ code: '42P01' }) // false: undefined table, a broken deployment
 * ```
 */
export function isDataError(err: unknown): boolean {
  for (let e: unknown = err, i = 0; typeof e === 'object' && e !== null && i < 5; i++) {
    const code = (e as { code?: unknown }).code
    if (typeof code === 'string' && /^[0-9A-Z]{5}$/.test(code)) {
      return /^(22|23|54)/.test(code) && code !== '23502'
    }
    e = (e as { cause?: unknown }).cause
  }
  return false
}

/**
 * NATS could not serve a JetStream request right now: it timed out, nobody answered (a stream or
 * meta leader being elected; js.publish reports that as JetStreamNotEnabled), or the server said
 * 503 / 10008 "JetStream system temporarily unavailable".
 */
export function isJetStreamUnavailable(err: unknown): boolean {
  const name = err instanceof Error ? err.name : ''
  if (['TimeoutError', 'NoResponders', 'JetStreamNotEnabled'].includes(name)) return true
  if (err instanceof RequestError && err.isNoResponders()) return true
  return err instanceof JetStreamApiError && (err.status === 503 || err.code === 10008)
}

/**
 * NATS refused a publish or subscription for this user (its role does not allow it). Never
 * transient: the same request is refused again until the server's configuration changes.
 */
export function isPermissionViolation(err: unknown): err is Error {
  for (let e: unknown = err, i = 0; e instanceof Error && i < 5; e = e.cause, i++) {
    if (e instanceof PermissionViolationError) return true
  }
  return false
}

export type BreakerState = 'closed' | 'open' | 'half-open'

/**
 * A circuit breaker for one dependency: three transient failures in a row open it; while open,
 * calls fail at once (the processor stops fetching); after a backoff one probe is let through
 * (half-open) and its success closes it.
 *
 * ```ts
 * const postgres = createBreaker('postgres', log)
 * await postgres.policy.execute(() => pool.query('select 1'))
 * ```
 */
export interface Breaker {
  readonly name: string
  readonly policy: CircuitBreakerPolicy
  readonly state: BreakerState
}

export function createBreaker(name: string, log: Logger): Breaker {
  const policy = circuitBreaker(handleWhen(isTransient), {
    halfOpenAfter: new ExponentialBackoff({ initialDelay: 1000, maxDelay: 30_000 }),
    breaker: new ConsecutiveBreaker(3),
  })
  policy.onBreak((e) => {
    log.warn(
      { dependency: name, err: 'error' in e ? errorSummary(e.error) : undefined },
      'circuit opened: stop fetching',
    )
  })
  policy.onHalfOpen(() => {
    log.info({ dependency: name }, 'circuit half-open: probing')
  })
  policy.onReset(() => {
    log.info({ dependency: name }, 'circuit closed: dependency is back')
  })
  return {
    name,
    policy,
    get state(): BreakerState {
      switch (policy.state) {
        case CircuitState.Closed:
          return 'closed'
        case CircuitState.HalfOpen:
          return 'half-open'
        default:
          return 'open'
      }
    },
  }
}
