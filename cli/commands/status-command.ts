/** `fleetstream status`: the figures of cli/fleet-status.ts, checked against thresholds. */
import { Command, Option } from 'commander'
import { loadConfig } from '../../infra/config.ts'
import { createLogger } from '../../infra/logger.ts'
import { loadProcessors, PROCESSOR_NAMES } from '../../processors/processor-registry.ts'
import { EXIT_THRESHOLD, fleetStatus, formatStatus } from '../fleet-status.ts'
import { JSON_HELP } from '../json-output.ts'
import { nonNegative, nonNegativeInteger, positive, selectProcessors } from '../options.ts'
import { terminalLogs } from '../terminal.ts'

interface StatusFlags {
  json?: boolean
  maxLag?: number
  maxStaleness?: number
  maxDlq?: number
  maxStorageUse?: number
  window: number
  timeout: number
}

export function statusCommand(): Command {
  return new Command('status')
    .description(
      `stream size and ingest rate, each processor's checkpoint, lag and staleness, DLQ depth and open alerts; exits ${EXIT_THRESHOLD} when a threshold is crossed, 1 when NATS or PostgreSQL cannot be reached`,
    )
    .argument(
      '[processor...]',
      `processors to report: ${PROCESSOR_NAMES.join(', ')} (all when none)`,
    )
    .option('--json', JSON_HELP.document('the report'))
    .addOption(
      new Option(
        '--max-lag <events>',
        "crossed when a processor is further behind: the larger of its checkpoint's distance to the stream and its consumer's pending + unacked",
      ).argParser(nonNegativeInteger),
    )
    .addOption(
      new Option(
        '--max-staleness <seconds>',
        'crossed when a processor with events to apply has not committed for longer',
      ).argParser(nonNegative),
    )
    .addOption(
      new Option('--max-dlq <entries>', 'crossed when a processor has more in the DLQ').argParser(
        nonNegativeInteger,
      ),
    )
    .addOption(
      new Option(
        '--max-storage-use <percent>',
        "crossed when FLEET_EVENTS uses more of its storage limit (its own or the account's)",
      ).argParser(nonNegative),
    )
    .addOption(
      new Option('--window <seconds>', 'measure the ingest rate over this long (0: skip)')
        .argParser(nonNegative)
        .default(1),
    )
    .addOption(
      new Option('--timeout <seconds>', 'give up reaching NATS and PostgreSQL after this long')
        .argParser(positive)
        .default(10),
    )
    .action(async (names: string[], opts: StatusFlags) => {
      const config = loadConfig()
      const log = createLogger({
        level: config.logLevel,
        name: 'fleetstream-status',
        destination: terminalLogs(),
      })
      const selected = selectProcessors(names)
      const specs = await loadProcessors(config, selected)
      const report = await fleetStatus(config, log, {
        processors: selected.map((n) => specs[n]),
        windowSeconds: opts.window,
        timeoutSeconds: opts.timeout,
        ...(opts.maxLag !== undefined ? { maxLag: opts.maxLag } : {}),
        ...(opts.maxStaleness !== undefined ? { maxStalenessSeconds: opts.maxStaleness } : {}),
        ...(opts.maxDlq !== undefined ? { maxDlq: opts.maxDlq } : {}),
        ...(opts.maxStorageUse !== undefined ? { maxStorageUse: opts.maxStorageUse } : {}),
      })
      console.log(opts.json ? JSON.stringify(report) : formatStatus(report))
      if (report.breaches.length > 0) {
        console.error(
          `fleetstream: ${report.breaches.length} threshold${report.breaches.length === 1 ? '' : 's'} crossed: ${report.breaches.map((b) => b.message).join('; ')}`,
        )
        process.exitCode = EXIT_THRESHOLD
      }
    })
}
