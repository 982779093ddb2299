/**
 * The one way fleetstream retries: {@link withBackoff}, a cockatiel policy with exponential
 * backoff and decorrelated jitter that logs each failure, and {@link errorSummary}, the one-line
 * error (with its causes) those log lines carry. A loop that only waits (a pause, a deadline, a
 * wake-up) uses infra/sleep.ts instead.
 */
import { ExponentialBackoff, handleWhen, retry, type RetryPolicy } from 'cockatiel'
import type { Logger } from './logger.ts'

export interface BackoffOptions {
  /** First delay; later ones grow exponentially with decorrelated jitter, so peers never sync up. */
  readonly initialDelayMs?: number
  readonly maxDelayMs?: number
  /** Defaults to retrying until the call succeeds or the signal aborts. */
  readonly maxAttempts?: number
  /** Errors for which a retry cannot help; they are rethrown at once. */
  readonly isPermanent?: (err: unknown) => boolean
  /**
   * Stop retrying at this time (epoch ms): the last error is rethrown (delays are kept short
   * enough not to overshoot it by much). Defaults to no limit.
   */
  readonly deadline?: number
}

/**
 * A retry policy for a dependency that may not be up yet or may come and go. Each failure is
 * logged with the next delay; nothing is cached: every attempt asks again.
 *
 * ```ts
 * const nc = await withBackoff(log, 'connect to NATS').execute(() => connect({ servers }), signal)
 * ```
 */
export function withBackoff(log: Logger, what: string, opts: BackoffOptions = {}): RetryPolicy {
  const isPermanent = opts.isPermanent ?? (() => false)
  const { deadline } = opts
  const maxDelay = opts.maxDelayMs ?? 10_000
  const policy = retry(
    handleWhen((err) => !isPermanent(err) && (deadline === undefined || Date.now() < deadline)),
    {
      maxAttempts: opts.maxAttempts ?? Number.POSITIVE_INFINITY,
      backoff: new ExponentialBackoff({
        initialDelay: opts.initialDelayMs ?? 200,
        maxDelay:
          deadline === undefined
            ? maxDelay
            : Math.max(100, Math.min(maxDelay, (deadline - Date.now()) / 4)),
      }),
    },
  )
  policy.onRetry((e) => {
    const err = 'error' in e ? e.error : undefined
    log.warn(
      { attempt: e.attempt, delayMs: Math.round(e.delay), err: errorSummary(err) },
      `${what}: not ready, retrying`,
    )
  })
  return policy
}

/** A one-line description of an error, with its cause chain. */
export function errorSummary(err: unknown): string {
  const parts: string[] = []
  let e: unknown = err
  for (let i = 0; e !== undefined && e !== null && i < 4; i++) {
    if (e instanceof Error) {
      const code = (e as { code?: unknown }).code
      parts.push(`${e.name}: ${e.message}${typeof code === 'string' ? ` (${code})` : ''}`)
      e = e.cause
    } else {
      parts.push(typeof e === 'string' ? e : JSON.stringify(e))
      break
    }
  }
  return parts.join(' <- ')
}
