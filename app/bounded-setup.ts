/** {@link setUp} bounded by a one-shot command's `--timeout`. */
import { isTransient } from '../infra/failures.ts'
import { errorSummary } from '../infra/retry.ts'
import { setUp, UnreachableError, type Runtime, type SetupReport } from './runtime.ts'

/** What `setup`, `rebuild` and `replay` wait for, each bounded by their `--timeout` (its help). */
export const SET_UP_WAITS = 'NATS, PostgreSQL and the set-up (streams, schema, consumers)'

/**
 * {@link setUp} for a one-shot command (`setup`, `rebuild`, `replay`): what it waits for (a stream
 * the admin has yet to create, a NATS leader being elected, Postgres restarting) is waited for at
 * most `timeoutSeconds`, like the connections before it; then it fails (exit 1) with the reason.
 *
 * ```ts
 * await setUpWithin(rt, opts.timeout, signal)
 * ```
 */
export async function setUpWithin(
  rt: Runtime,
  timeoutSeconds: number,
  signal: AbortSignal,
): Promise<SetupReport> {
  const deadline = Date.now() + timeoutSeconds * 1000
  try {
    return await setUp(rt, signal, { deadline })
  } catch (err) {
    if (signal.aborted || !isTransient(err)) throw err
    throw new UnreachableError(
      `set-up did not complete within ${timeoutSeconds} s: ${errorSummary(err)}`,
      { cause: err },
    )
  }
}
