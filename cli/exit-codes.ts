/**
 * The exit codes of every fleetstream command (README, "Exit codes"), following from the kind of
 * error that reached the top (schemas/errors.ts).
 */
import { FleetstreamError, OperatorError } from '../schemas/errors.ts'

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
