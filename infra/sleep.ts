/**
 * Waiting, not retrying: a pause that a signal cuts short, a deadline on a promise, and a wake-up
 * for loops that poll. Retrying with backoff is infra/retry.ts (`withBackoff`).
 */
import { TransientError } from '../schemas/errors.ts'

/** Resolves after `ms`, or at once when the signal aborts (never rejects). */
export function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) {
      resolve()
      return
    }
    const done = () => {
      clearTimeout(timer)
      signal.removeEventListener('abort', done)
      resolve()
    }
    const timer = setTimeout(done, Math.max(0, ms))
    signal.addEventListener('abort', done, { once: true })
  })
}

/** Rejects with an error naming `what` when `promise` has not settled after `ms`. */
export async function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      reject(new DeadlineError(`${what}: no answer within ${ms} ms`))
    }, ms)
  })
  try {
    return await Promise.race([promise, timeout])
  } finally {
    clearTimeout(timer)
  }
}

/** A bounded wait ran out: what was waited for may still answer (see {@link within}). */
export class DeadlineError extends TransientError {}

/**
 * Lets a loop that waits between rounds be woken early: `wait` resolves after `ms`, on
 * `notify()` (also one that came while nobody waited), or when `signal` aborts.
 */
export class Wakeup {
  #pending = new AbortController()

  notify(): void {
    this.#pending.abort()
  }

  async wait(ms: number, signal: AbortSignal): Promise<void> {
    const pending = this.#pending
    if (!pending.signal.aborted) await sleep(ms, AbortSignal.any([signal, pending.signal]))
    if (pending.signal.aborted) this.#pending = new AbortController()
  }
}
