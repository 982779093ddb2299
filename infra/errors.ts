/**
 * The kinds of failure fleetstream names, each saying what the caller does next. Every error class
 * of the project extends one of them, so a new one is handled right wherever it is thrown:
 *
 * - {@link BadInputError}: a device sent something that breaks a rule. The event is parked in the
 *   DLQ with the message as its reason; the processor goes on. The message names the field, the
 *   rule and the value.
 * - {@link OperatorError}: bad usage or configuration, or an answer such as "not found". A command
 *   exits 2 and prints the message, which lists every problem at once.
 * - {@link TransientError}: a dependency is unreachable, restarting or busy, or a lease was lost.
 *   It is retried with backoff; a command whose bounded wait runs out exits 1 with the message.
 * - anything else is a bug: a command exits 1 with the error and its causes.
 *
 * Foreign errors (pg's SQLSTATEs, NATS codes) are sorted by `infra/failures.ts`.
 */
export abstract class FleetstreamError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options)
    this.name = new.target.name
  }
}

/** A device's input breaks a rule: parked with the message as its reason, never retried. */
export class BadInputError extends FleetstreamError {}

/** Bad usage or configuration, or a definite answer ("not found"): exit 2, nothing retried. */
export class OperatorError extends FleetstreamError {}

/** A retry can fix it: a dependency is down, busy or changing leaders, or a lease moved. */
export class TransientError extends FleetstreamError {}

/** Exit codes of every fleetstream command (README, "Exit codes"). */
export const EXIT_OK = 0
export const EXIT_FAILED = 1
export const EXIT_USAGE = 2
export const EXIT_INTERRUPTED = 130

/**
 * The exit code a command ends with when `err` reaches the top: 2 for an operator's mistake or a
 * definite answer, 1 for everything else.
 */
export function exitCodeOf(err: unknown): typeof EXIT_FAILED | typeof EXIT_USAGE {
  return err instanceof OperatorError ? EXIT_USAGE : EXIT_FAILED
}

/**
 * Whether the message alone tells an operator what happened (one of ours), or the error is
 * unexpected and its class and causes are worth printing too.
 */
export function isExpected(err: unknown): err is FleetstreamError {
  return err instanceof FleetstreamError
}
