/**
 * The `fleetstream` command tree (the binary, cli/fleetstream.ts, loads it once telemetry runs):
 * each command lives in cli/commands/; this file adds them in the order `--help` lists them and
 * turns what a command throws into its exit code (README.md, "Exit codes"): 0 done, 1 failed, 2
 * bad usage or configuration or a definite answer such as "not found" (an OperatorError), 3 a
 * `status` threshold crossed, 130 interrupted.
 */
import { Command, CommanderError } from 'commander'
import { EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, exitCodeOf, isExpected } from './exit-codes.ts'
import { redact } from '../infra/redact.ts'
import { errorSummary } from '../infra/retry.ts'
import { alertsCommand } from './commands/alerts-command.ts'
import { devicesCommand } from './commands/devices-command.ts'
import { dlqCommand } from './commands/dlq-command.ts'
import { eventsCommand } from './commands/events-command.ts'
import { rebuildCommand, replayCommand } from './commands/rebuild-command.ts'
import { clockCommand, runCommand } from './commands/run-command.ts'
import { setupCommand } from './commands/setup-command.ts'
import { simulateCommand } from './commands/simulate-command.ts'
import { startCommand } from './commands/start-command.ts'
import { statusCommand } from './commands/status-command.ts'
import { wasInterrupted } from './command-process.ts'
import { JSON_RULE } from './json-output.ts'
import { UsageError } from './options.ts'
import { packageVersion, usageHint, withUsageHints } from './usage.ts'

const program = new Command()
  .name('fleetstream')
  .description(
    'Event-sourced stream processor for IoT sensor fleets (NATS JetStream -> PostgreSQL).',
  )
  .version(packageVersion())
  .addHelpText(
    'after',
    `
Environment: NATS_URL (default nats://127.0.0.1:4222), DATABASE_URL (default
postgres://postgres@127.0.0.1:5432/fleetstream), LOG_LEVEL, and the tuning variables in README.md.

${JSON_RULE}`,
  )

for (const command of [
  setupCommand(),
  runCommand(),
  clockCommand(),
  statusCommand(),
  rebuildCommand(),
  replayCommand(),
  dlqCommand(),
  eventsCommand(),
  devicesCommand(),
  alertsCommand(),
  simulateCommand(),
  startCommand(),
]) {
  program.addCommand(command)
}

/** The exit code of a command that threw `err`, after saying why on stderr. */
function exitCodeAfter(err: unknown): number {
  // commander has printed its own usage errors; help and --version end here too, with 0.
  if (err instanceof CommanderError) {
    return err.exitCode === 0 ? EXIT_OK : EXIT_USAGE
  }
  console.error(`fleetstream: ${redact(isExpected(err) ? err.message : errorSummary(err))}`)
  if (err instanceof UsageError && usageHint()) console.error(usageHint())
  const code = exitCodeOf(err)
  return wasInterrupted() && code !== EXIT_USAGE ? EXIT_INTERRUPTED : code
}

// `fleetstream events list | head`: once the reader has gone, a write to stdout fails with EPIPE.
// Unix tools die of SIGPIPE then, quietly; Node ignores that signal, and the failed write would
// crash the process with a stack trace. Stop as they do instead.
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code !== 'EPIPE') throw err
  process.exit(typeof process.exitCode === 'number' ? process.exitCode : EXIT_OK)
})

try {
  await withUsageHints(program).parseAsync()
} catch (err) {
  process.exitCode = exitCodeAfter(err)
}
