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
 * Foreign errors (pg's SQLSTATEs, NATS codes) are sorted by `infra/failures.ts`; the exit code a
 * kind gives is in `cli/exit-codes.ts`. This file imports nothing, so every folder, schemas/
 * included, may use it.
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
