import { once } from 'node:events'
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander'
import { loadConfig, ConfigError, type Config } from '../infra/config.ts'
import { createLogger } from '../infra/logger.ts'
import { redact } from '../infra/redact.ts'
import { runClock } from '../infra/clock-service.ts'
import { createPublisher } from '../infra/publisher.ts'
import { isPermissionViolation } from '../infra/failures.ts'
import { errorSummary, withBackoff } from '../infra/retry.ts'
import { isTransient } from '../infra/failures.ts'
import { DatabaseMissingError } from '../infra/database.ts'
import { loadProcessors, PROCESSOR_NAMES, type ProcessorName } from '../processors/index.ts'
import { startProcessor } from '../processors/runner/runner.ts'
import type { EventKind } from '../schemas/events.ts'
import { ReplayUsageError } from '../processors/admin/replay.ts'
import { RebuildRefusedError } from '../processors/admin/blue-green.ts'
import { HybridLogicalClock } from '../schemas/hlc.ts'
import { simulateFleet, type SimulationOptions } from '../simulator/fleet.ts'
import { DlqCommandError, dlqDepth, listDlq, showDlq } from '../processors/dlq/inspect.ts'
import { redriveDlq } from '../processors/dlq/redrive.ts'
import { devicesCommand, DevicesCommandError } from './devices.ts'
import {
  ensureMqttMessagesStream,
  ensureStreams,
  MQTT_MESSAGES_STREAM,
  StreamConflictError,
} from '../infra/streams.ts'
import {
  EVENT_KIND_NAMES,
  EventNotFoundError,
  EventsCommandError,
  formatEvent,
  openEventsSource,
  parseDeviceOption,
  parseSinceOption,
  showEvent,
  tailEvents,
  type EventsSource,
} from './events.ts'
import {
  acknowledgeAlert,
  AlertCommandError,
  formatAlert,
  listAlerts,
  type ListOptions,
} from './alerts.ts'
import { JSON_HELP, JSON_RULE } from './json-output.ts'
import { NO_OBSERVABILITY, startObservability, type Observability } from './observability.ts'
import { fmt, progressBar, startProgress } from './progress.ts'
import { formatDlqTable } from './dlq-table.ts'
import { formatEventLine } from './event-line.ts'
import { columnsOf, terminalLogs } from './terminal.ts'
import { packageVersion, usageHint, withUsageHints } from './usage.ts'
import { parseSince, rebuildCommand, replayCommand } from './rebuild.ts'
import { printJsonLine, printSummary, startedLine, startJsonProgress } from './start-output.ts'
import { SET_UP_WAITS, setUpWithin } from './bounded-setup.ts'
import { openRuntime, setUp, type Runtime } from './runtime.ts'
import { EXIT_THRESHOLD, fleetStatus, formatStatus, UnreachableError } from './status.ts'

/**
 * Exit codes: 0 done, 1 failed (or NATS/PostgreSQL not reached within a one-shot command's
 * `--timeout`, or no database: only setup and the services create it), 2 bad usage or
 * configuration (a refused login too), 3 a `status` threshold crossed, 130 interrupted (a one-shot command stopped by
 * SIGINT/SIGTERM before it finished; any command on a second signal).
 */
const EXIT_FAILED = 1
const EXIT_USAGE = 2
const EXIT_INTERRUPTED = 130
/** Set on the first SIGINT/SIGTERM: a command that fails after it was interrupted exits 130. */
const signals = { interrupted: false }

/** The fleet options `simulate` and `start` share; only what --duration means differs. */
function withSimulationOptions(cmd: Command, duration: { help: string; default: number }): Command {
  return cmd
    .addOption(
      new Option('--devices <n>', 'simulated sensors').argParser(positiveInteger).default(100),
    )
    .addOption(
      new Option('--rate <events/s>', 'events per second across the fleet')
        .argParser(positive)
        .default(200),
    )
    .addOption(
      new Option('--duration <seconds>', duration.help)
        .argParser(nonNegative)
        .default(duration.default),
    )
    .addOption(
      new Option('--duplicates <ratio>', 'share of publishes that re-send an earlier event (0..1)')
        .argParser(ratio)
        .default(0.05),
    )
    .addOption(
      new Option('--seed <n>', 'seed for a repeatable fleet').argParser(nonNegativeInteger),
    )
    .addOption(
      new Option('--outage-share <ratio>', 'share of devices that lose the network at once (0..1)')
        .argParser(ratio)
        .default(0),
    )
    .addOption(
      new Option('--outage-at <seconds>', 'when the outage starts')
        .argParser(nonNegative)
        .default(5),
    )
    .addOption(
      new Option('--outage-for <seconds>', 'how long it lasts').argParser(nonNegative).default(10),
    )
    .addOption(
      new Option(
        '--reconnect-jitter <seconds>',
        'each device reconnects after a random delay up to this',
      )
        .argParser(nonNegative)
        .default(5),
    )
}

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

program
  .command('setup')
  .description(
    'create the database schema, the FLEET_EVENTS, FLEET_DLQ and FLEET_NOTIFICATIONS streams and the consumers (idempotent)',
  )
  .option('--json', JSON_HELP.document('the report'))
  .addOption(timeoutOption(SET_UP_WAITS))
  .action(async (opts: { json?: boolean; timeout: number }) => {
    await oneShot('fleetstream-setup', { ...opts, createDatabase: true }, async (rt, signal) => {
      const report = await setUpWithin(rt, opts.timeout, signal)
      const mqtt = await ensureMqttMessagesStream(rt.nc, rt.config.streams)
      if (opts.json) console.log(JSON.stringify(report))
      else {
        console.log(
          `schema: ${report.migrations.length ? `applied ${report.migrations.join(', ')}` : 'up to date'}`,
        )
        for (const [name, r] of Object.entries(report.streams)) console.log(`stream ${name}: ${r}`)
        if (mqtt !== 'unreachable') console.log(`stream ${MQTT_MESSAGES_STREAM}: ${mqtt}`)
        for (const [name, r] of Object.entries(report.consumers))
          console.log(`consumer ${name}: ${r}`)
      }
    })
  })

program
  .command('run')
  .description('run processors until SIGINT/SIGTERM (all of them when none is named)')
  .argument('[processor...]', `processors to run: ${PROCESSOR_NAMES.join(', ')}`)
  .option('--no-clock', 'do not publish clock ticks from this process')
  .action(async (names: string[], opts: { clock: boolean }) => {
    const selected = selectProcessors(names)
    await withRuntime(
      'fleetstream-run',
      async (rt, signal, obs) => {
        await setUp(rt, signal)
        const running = selected.map((name) =>
          startProcessor(rt.processors[name], { ...rt, metrics: obs.metrics }),
        )
        const clock = opts.clock ? startClock(rt, signal) : Promise.resolve()
        await waitForAbort(signal)
        await Promise.all([...running.map((p) => p.stop()), clock])
      },
      { serve: true },
    )
  })

program
  .command('clock')
  .description(
    'publish clock ticks into the stream until SIGINT/SIGTERM (run and start include one)',
  )
  .action(async () => {
    await withRuntime('fleetstream-clock', async (rt, signal) => {
      await setUp(rt, signal)
      await startClock(rt, signal)
    })
  })

program
  .command('status')
  .description(
    `stream size and ingest rate, each processor's checkpoint, lag and staleness, DLQ depth and open alerts; exits ${EXIT_THRESHOLD} when a threshold is crossed, 1 when NATS or PostgreSQL cannot be reached`,
  )
  .argument('[processor...]', `processors to report: ${PROCESSOR_NAMES.join(', ')} (all when none)`)
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
  .action(
    async (
      names: string[],
      opts: {
        json?: boolean
        maxLag?: number
        maxStaleness?: number
        maxDlq?: number
        maxStorageUse?: number
        window: number
        timeout: number
      },
    ) => {
      const config = loadConfig()
      const log = createLogger({
        level: config.logLevel,
        name: 'fleetstream-status',
        destination: terminalLogs(),
      })
      const specs = await loadProcessors(config)
      const report = await fleetStatus(config, log, {
        processors: selectProcessors(names).map((n) => specs[n]),
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
    },
  )

program
  .command('rebuild')
  .description(
    'blue/green rebuild of a projection from sequence 1 into new tables while the live one keeps serving; swapped in atomically once caught up',
  )
  .argument(
    '<projection>',
    `the processor whose projection to rebuild: ${PROCESSOR_NAMES.join(', ')}`,
    processorName,
  )
  .addOption(
    new Option('--batch-size <n>', 'events per transaction into the new tables')
      .argParser(positiveInteger)
      .default(5000),
  )
  .option(
    '--drop-retired',
    'drop the replaced tables after the swap instead of keeping them in a retired_* schema',
  )
  .option('--json', JSON_HELP.document('the result'))
  .addOption(timeoutOption(SET_UP_WAITS))
  .addHelpText(
    'after',
    `
The live projection answers queries throughout; the swap holds its tables for milliseconds. If the
rebuild fails or is killed, the live tables are untouched (a leftover rebuild_* schema is dropped by
the next rebuild). Exit codes: 0 swapped in, 1 failed, 2 bad usage.`,
  )
  .action(
    async (
      name: ProcessorName,
      opts: { batchSize: number; dropRetired?: boolean; json?: boolean; timeout: number },
    ) => {
      await oneShot('fleetstream-rebuild', opts, async (rt, signal) => {
        await setUpWithin(rt, opts.timeout, signal)
        await rebuildCommand(rt, name, opts, signal)
      })
    },
  )

program
  .command('replay')
  .description(
    "re-apply events from a stream sequence or a time: moves the processor's checkpoint back and watches it catch up",
  )
  .argument('<projection>', `the processor to replay: ${PROCESSOR_NAMES.join(', ')}`, processorName)
  .addOption(
    new Option('--from-seq <n>', 'the first FLEET_EVENTS sequence to apply again').argParser(
      positiveInteger,
    ),
  )
  .addOption(
    new Option(
      '--since <time>',
      'from the first event stored at or after this time: ISO 8601 with a zone, or a duration ago (90s, 15m, 2h, 7d)',
    ).argParser((v) => parseSince(v)),
  )
  .option('--no-wait', 'move the checkpoint back and exit without watching the processor catch up')
  .option('--json', JSON_HELP.document('the result'))
  .addOption(timeoutOption(SET_UP_WAITS))
  .addHelpText(
    'after',
    `
Give exactly one of --from-seq and --since. The projections are idempotent: events applied before
change nothing; events missed or parked and since fixed are applied. A running processor notices at
once and re-anchors its consumer; a stopped one replays when it starts.`,
  )
  .action(
    async (
      name: ProcessorName,
      opts: {
        fromSeq?: number
        since?: ReturnType<typeof parseSince>
        wait: boolean
        json?: boolean
        timeout: number
      },
    ) => {
      if ((opts.fromSeq === undefined) === (opts.since === undefined)) {
        throw new InvalidArgumentError(`give exactly one of '--from-seq <n>' and '--since <time>'`)
      }
      await oneShot('fleetstream-replay', opts, async (rt, signal) => {
        await setUpWithin(rt, opts.timeout, signal)
        await replayCommand(rt, name, opts, signal)
      })
    },
  )

const dlq = program.command('dlq').description('inspect and redrive events parked in FLEET_DLQ')

dlq
  .command('list')
  .description('parked events, oldest first, with the DLQ depth per processor')
  .addOption(
    new Option('--processor <name>', 'only those this processor parked').choices([
      ...PROCESSOR_NAMES,
    ]),
  )
  .option('--json', JSON_HELP.array('entries'))
  .addOption(timeoutOption('NATS'))
  .action(async (opts: { processor?: ProcessorName; json?: boolean; timeout: number }) => {
    await oneShot('fleetstream-dlq', { ...opts, postgres: false }, async (rt) => {
      const entries = await listDlq(rt, opts.processor)
      if (opts.json) {
        console.log(JSON.stringify(entries))
        return
      }
      const depth = await dlqDepth(rt)
      const per = Object.entries(depth.byProcessor).map(([p, n]) => `${p} ${fmt(n)}`)
      console.log(
        `${rt.config.streams.dlq}: ${fmt(depth.total)} parked${per.length ? ` (${per.join(', ')})` : ''}`,
      )
      if (entries.length > 0)
        console.log(formatDlqTable(entries, columnsOf(process.stdout)).join('\n'))
    })
  })

dlq
  .command('show')
  .description('one parked event: why, where from, its headers and body')
  .argument('<seq>', 'its sequence in FLEET_DLQ (see dlq list)', positiveInteger)
  .option('--json', JSON_HELP.document('it'))
  .addOption(timeoutOption('NATS'))
  .action(async (seq: number, opts: { json?: boolean; timeout: number }) => {
    await oneShot('fleetstream-dlq', { ...opts, postgres: false }, async (rt) => {
      const e = await showDlq(rt, seq)
      if (opts.json) {
        console.log(JSON.stringify(e))
        return
      }
      console.log(
        [
          `seq:        ${e.seq} (parked ${e.parkedAt})`,
          `processor:  ${e.processor}`,
          `reason:     ${e.reason}`,
          `detail:     ${e.detail}`,
          `attempts:   ${e.attempts} (delivered ${e.deliveries} times)`,
          `origin:     ${e.stream} #${e.streamSeq} on ${e.subject}`,
          ...(e.headersCut || e.bodyCut
            ? [
                `cut:        ${[e.headersCut && `headers ${e.headersCut}`, e.bodyCut && `body ${e.bodyCut}`].filter(Boolean).join('; ')} (whole in ${e.stream} #${e.streamSeq}: fleetstream events show ${e.streamSeq})`,
              ]
            : []),
          'headers:',
          ...Object.entries(e.headers).map(([k, v]) => `  ${k}: ${v}`),
          e.bodyNote ? `body (${e.bodyNote}):` : 'body:',
          typeof e.body === 'string' ? e.body : JSON.stringify(e.body, null, 2),
        ].join('\n'),
      )
    })
  })

dlq
  .command('redrive')
  .description(
    'put parked events back for the processor that parked them (the others skip them), rate-limited',
  )
  .option('--seq <n...>', 'these entries', (v: string, prev: number[] | undefined) => [
    ...(prev ?? []),
    positiveInteger(v),
  ])
  .option('--all', 'every entry (of --processor, if given)')
  .addOption(
    new Option('--processor <name>', 'with --all: only those this processor parked').choices([
      ...PROCESSOR_NAMES,
    ]),
  )
  .addOption(
    new Option('--rate <events/s>', 'at most this many per second').argParser(positive).default(50),
  )
  .option('--json', JSON_HELP.array('entries redriven'))
  .addOption(timeoutOption('NATS'))
  .action(
    async (opts: {
      seq?: number[]
      all?: boolean
      processor?: ProcessorName
      rate: number
      json?: boolean
      timeout: number
    }) => {
      if ((opts.seq === undefined) === (opts.all !== true)) {
        throw new InvalidArgumentError(`give exactly one of '--seq <n...>' and '--all'`)
      }
      await oneShot('fleetstream-dlq', { ...opts, postgres: false }, async (rt, signal) => {
        // A bar on a terminal only: elsewhere the final count says it.
        const bar =
          opts.all && columnsOf(process.stderr)
            ? progressBar('redrive', { unit: 'events' })
            : undefined
        const { done, failed } = await redriveDlq(rt, {
          ...(opts.seq ? { seqs: opts.seq } : {}),
          ...(opts.processor ? { processor: opts.processor } : {}),
          ratePerSecond: opts.rate,
          signal,
          onProgress: (p) => {
            bar?.update(p.handled, p.total, p.failed > 0 ? `${fmt(p.failed)} failed` : '')
          },
        }).finally(() => {
          bar?.finish()
        })
        for (const f of failed) {
          console.error(
            `failed ${f.entry.seq}: ${f.entry.subject} #${f.entry.streamSeq}: ${f.error}`,
          )
        }
        if (failed.length > 0) process.exitCode = EXIT_FAILED
        if (opts.json) {
          console.log(
            JSON.stringify(
              done.map((e) => ({ seq: e.seq, processor: e.processor, subject: e.subject })),
            ),
          )
          return
        }
        if (!opts.all) {
          for (const e of done)
            console.log(`redriven ${e.seq}: ${e.subject} #${e.streamSeq} for ${e.processor}`)
        }
        const left = (await dlqDepth(rt)).total
        console.log(
          `redriven ${fmt(done.length)} event${done.length === 1 ? '' : 's'}; ${failed.length > 0 ? `${fmt(failed.length)} failed (left in the DLQ); ` : ''}${fmt(left)} left in ${rt.config.streams.dlq}`,
        )
      })
    },
  )

const events = program
  .command('events')
  .description('inspect FLEET_EVENTS: follow events as they arrive, show one by stream sequence')

events
  .command('tail')
  .description(
    'the newest events, then new ones as they are stored, until Ctrl-C (like tail -f); reads through an ordered consumer that leaves nothing behind',
  )
  .option('--device <id>', `only this device ('_system' for clock ticks)`, parseDeviceOption)
  .addOption(new Option('--kind <kind>', 'only this kind of event').choices(EVENT_KIND_NAMES))
  .addOption(
    new Option('--from-seq <n>', 'start at this stream sequence')
      .argParser(positiveInteger)
      .conflicts('since'),
  )
  .addOption(
    new Option(
      '--since <time>',
      'start at events stored since this ISO 8601 time, or this long ago (90s, 15m, 2h, 1d)',
    ).argParser((v) => parseSinceOption(v)),
  )
  .addOption(
    new Option('--last <n>', 'start with the newest n matching events; 0 for only new ones')
      .argParser(nonNegativeInteger)
      .default(10)
      .conflicts(['fromSeq', 'since']),
  )
  .addOption(new Option('--limit <n>', 'stop after n events').argParser(positiveInteger))
  .option('--json', JSON_HELP.lines('event'))
  .option('--verbose', 'each event in full (as events show prints it) instead of one line')
  .addOption(timeoutOption('NATS'))
  .action(async (opts: TailFlags) => {
    await withNats('fleetstream-events', opts.timeout, async (src, signal) => {
      const tail = tailEvents(
        src,
        {
          deviceId: opts.device,
          kind: opts.kind,
          fromSeq: opts.fromSeq,
          since: opts.since,
          last: opts.last,
          limit: opts.limit,
          onStart: (s) => {
            if (opts.json) return
            const from =
              s.since !== undefined
                ? `stored since ${s.since.toISOString()}`
                : `from sequence ${s.fromSeq ?? '?'}`
            console.error(
              `${src.stream} ${s.filter} ${from}${opts.limit ? `, ${opts.limit} events` : ' (Ctrl-C to stop)'}`,
            )
          },
        },
        signal,
      )
      let first = true
      for await (const e of tail) {
        if (opts.json) console.log(JSON.stringify(e))
        else if (opts.verbose) console.log(`${first ? '' : '\n'}${formatEvent(e)}`)
        else console.log(formatEventLine(e, columnsOf(process.stdout)))
        first = false
      }
    })
  })

events
  .command('show')
  .description('one event by stream sequence: decoded envelope, HLC as a time, headers')
  .argument('<seq>', 'its sequence in FLEET_EVENTS', positiveInteger)
  .option('--json', JSON_HELP.document('it'))
  .addOption(timeoutOption('NATS'))
  .action(async (seq: number, opts: { json?: boolean; timeout: number }) => {
    await withNats('fleetstream-events', opts.timeout, async (src) => {
      const e = await showEvent(src, seq)
      console.log(opts.json ? JSON.stringify(e) : formatEvent(e))
    })
  })

program.addCommand(devicesCommand())

const alerts = program.command('alerts').description('list and acknowledge alerts')

alerts
  .command('list')
  .description('alerts from the read model, most severe and newest first')
  .addOption(
    new Option('--state <state>', 'only this state').choices(['open', 'acknowledged', 'resolved']),
  )
  .addOption(
    new Option('--severity <severity>', 'only this severity').choices([
      'info',
      'warning',
      'critical',
    ]),
  )
  .option('--device <id>', 'only this sensor')
  .addOption(new Option('--limit <n>', 'at most this many').argParser(positiveInteger).default(100))
  .option('--json', JSON_HELP.array('alerts'))
  .addOption(timeoutOption('PostgreSQL'))
  .action(async (opts: ListOptions & { json?: boolean; timeout: number }) => {
    await oneShot('fleetstream-alerts', { ...opts, nats: false }, async (rt) => {
      const rows = await listAlerts(rt, opts)
      if (opts.json) console.log(JSON.stringify(rows))
      else if (rows.length === 0) console.log('no alerts')
      else for (const a of rows) console.log(formatAlert(a))
    })
  })

alerts
  .command('ack')
  .description('acknowledge an open alert: publishes an alert.acknowledged event into the stream')
  .argument('<alert-id>', 'the alert to acknowledge (see alerts list)')
  .requiredOption('--by <name>', 'who acknowledges it')
  .option('--note <text>', 'why, for the record')
  .option('--json', JSON_HELP.document('the result'))
  .addOption(timeoutOption())
  .action(
    async (
      alertId: string,
      opts: { by: string; note?: string; json?: boolean; timeout: number },
    ) => {
      await oneShot('fleetstream-alerts', opts, async (rt) => {
        const r = await acknowledgeAlert(
          rt,
          clockFor(rt.config, 'cli'),
          alertId,
          opts.by,
          opts.note,
        )
        if (opts.json) console.log(JSON.stringify({ alertId, eventId: r.eventId, seq: r.seq }))
        else
          console.log(
            `acknowledged ${alertId} (${r.alert.device_id}, ${r.alert.rule_id}): event ${r.eventId} at stream sequence ${r.seq}`,
          )
      })
    },
  )

withSimulationOptions(
  program
    .command('simulate')
    .description(
      'publish a simulated fleet: registrations, then readings and heartbeats at a rate, with re-sent duplicates',
    ),
  { help: 'seconds to run; 0 runs until Ctrl-C', default: 10 },
)
  .option('--json', JSON_HELP.document('the summary'))
  .addOption(timeoutOption('NATS'))
  .action(async (opts: SimulateFlags & { json?: boolean; timeout: number }) => {
    await oneShot('fleetstream-simulate', { ...opts, postgres: false }, async (rt, signal) => {
      // The streams only: the simulator publishes, it has no use for the database. The gateway
      // role may not touch the JetStream API at all: it never sets up (asking would only be
      // refused, and the refusal logged as a NATS connection error on every start).
      const mayNotSetUp = rt.config.natsAuth?.user === 'gateway'
      await (mayNotSetUp ? Promise.resolve() : setUpStreams(rt, signal)).catch((err: unknown) => {
        // Devices publish; they do not set up (README.md, "NATS roles").
        if (!isPermissionViolation(err)) throw err
        rt.log.info(
          { err: errorSummary(err) },
          'this NATS user may not set up streams (the device role): publishing into the streams fleetstream setup created',
        )
      })
      const publisher = createPublisher(rt.js, { clock: clockFor(rt.config, 'sim') })
      const stats = await simulateFleet(publisher, simulation(opts), signal)
      if (opts.json) console.log(JSON.stringify(stats))
      else {
        const rate = Math.round(
          (stats.sent + stats.resent) / Math.max(stats.elapsedMs / 1000, 0.001),
        )
        console.log(
          `sent ${fmt(stats.sent)} events and ${fmt(stats.resent)} re-sends in ${(stats.elapsedMs / 1000).toFixed(1)} s ` +
            `(${fmt(rate)}/s); the stream stored ${fmt(stats.stored)} and reported ${fmt(stats.duplicateAcks)} duplicates` +
            (stats.reconnected > 0
              ? `; ${fmt(stats.reconnected)} devices reconnected within ${stats.reconnectSeconds.toFixed(1)} s and replayed ${fmt(stats.buffered)} buffered events`
              : ''),
        )
      }
    })
  })

withSimulationOptions(
  program
    .command('start')
    .description(
      'the main job: set up, run every processor and a simulated fleet, show live progress until Ctrl-C',
    )
    .option('--json', JSON_HELP.lines('step of the run (started, progress each second, finished)')),
  {
    help: 'stop the simulator after this many seconds, let processors catch up, and exit; 0 runs until Ctrl-C',
    default: 0,
  },
).action(async (opts: SimulateFlags & { json?: boolean }) => {
  await withRuntime(
    'fleetstream-start',
    async (rt, signal, obs) => {
      const report = await setUp(rt, signal)
      await ensureMqttMessagesStream(rt.nc, rt.config.streams)
      if (opts.json) printJsonLine(startedLine(rt.config, report.streams, obs.url))
      else
        // A line each, so that a 100-column terminal does not wrap them.
        console.log(
          `fleetstream: NATS ${redact(rt.config.natsUrl)}, PostgreSQL ${redact(rt.config.databaseUrl)}\n` +
            `streams: ${Object.entries(report.streams)
              .map(([n, r]) => `${n} (${r})`)
              .join(', ')}` +
            (obs.url ? `\nmetrics: ${obs.url}/metrics` : ''),
        )
      const running = Object.values(rt.processors).map((spec) =>
        startProcessor(spec, { ...rt, metrics: obs.metrics }),
      )
      // The clock stops with the job, which ends by itself after --duration as well as on a signal.
      const finished = new AbortController()
      const clock = startClock(rt, AbortSignal.any([signal, finished.signal]))
      const publisher = createPublisher(rt.js, { clock: clockFor(rt.config, 'sim') })
      const progress = (opts.json ? startJsonProgress : startProgress)(rt, running, publisher)
      try {
        await simulateFleet(publisher, simulation(opts), signal)
        if (!signal.aborted) {
          progress.note(
            'simulator finished; waiting for the processors to catch up (Ctrl-C to stop now)',
          )
          await progress.caughtUp(signal)
        }
      } finally {
        finished.abort()
        await Promise.all([...running.map((p) => p.stop()), clock])
        await progress.stop()
      }
      if (!opts.json) printSummary(rt, running, publisher.stats)
    },
    { serve: true, ...(process.env.LOG_LEVEL ? {} : { logLevel: 'warn' }) },
  )
})

interface TailFlags {
  device?: string
  kind?: EventKind
  fromSeq?: number
  since?: Date
  last: number
  limit?: number
  json?: boolean
  verbose?: boolean
  timeout: number
}

interface SimulateFlags {
  devices: number
  rate: number
  duration: number
  duplicates: number
  seed?: number
  outageShare: number
  outageAt: number
  outageFor: number
  reconnectJitter: number
}

function simulation(opts: SimulateFlags): SimulationOptions {
  return {
    devices: opts.devices,
    rate: opts.rate,
    durationSeconds: opts.duration,
    duplicateRatio: opts.duplicates,
    ...(opts.seed !== undefined ? { seed: opts.seed } : {}),
    ...(opts.outageShare > 0
      ? {
          outage: {
            share: opts.outageShare,
            atSeconds: opts.outageAt,
            forSeconds: opts.outageFor,
            reconnectJitterSeconds: opts.reconnectJitter,
          },
        }
      : {}),
  }
}

function clockFor(config: Config, role: string): HybridLogicalClock {
  return new HybridLogicalClock({
    node: `${role}-${config.nodeId}`.slice(0, 64),
    maxOffsetMs: config.hlcMaxOffsetMs,
  })
}

function selectProcessors(names: string[]): ProcessorName[] {
  if (names.length === 0) return [...PROCESSOR_NAMES]
  return names.map((n) => {
    if (!(PROCESSOR_NAMES as readonly string[]).includes(n)) {
      throw new InvalidArgumentError(
        `'processor' must be one of ${PROCESSOR_NAMES.join(', ')}, got '${n}'`,
      )
    }
    return n as ProcessorName
  })
}

/** Ticks into the stream from this process until the signal aborts (deduplicated across processes). */
function startClock(rt: Runtime, signal: AbortSignal): Promise<void> {
  // Few, short attempts: a tick that NATS is not taking is skipped (the next boundary comes), and
  // a shutdown is not held up by a minute of retries while NATS is away.
  const publisher = createPublisher(rt.js, {
    clock: clockFor(rt.config, 'clock'),
    maxAttempts: 2,
    timeoutMs: 2000,
  })
  return runClock(
    publisher,
    {
      intervalSeconds: rt.config.clockTickSeconds,
      partitions: rt.config.partitions,
      log: rt.log,
    },
    signal,
  )
}

/**
 * Runs a command with open connections and a signal that aborts on the first SIGINT/SIGTERM
 * (finish in-flight work, shut down cleanly); a second one exits at once with 130. With `serve`,
 * metrics, health and readiness are served on METRICS_PORT from before the connections open
 * until the command is done.
 */
async function withRuntime(
  name: string,
  body: (rt: Runtime, signal: AbortSignal, obs: Observability) => Promise<void>,
  opts: RuntimeOptions = {},
): Promise<void> {
  const config = loadConfig()
  const log = createLogger({
    level: opts.logLevel ?? config.logLevel,
    name,
    destination: terminalLogs(),
  })
  const obs = opts.serve ? await startObservability(config, log, name) : NO_OBSERVABILITY
  const stop = new AbortController()
  const onSignal = (sig: NodeJS.Signals) => {
    if (stop.signal.aborted) {
      log.warn({ signal: sig }, 'second signal: exiting now')
      process.exit(130)
    }
    log.info({ signal: sig }, 'shutting down: finishing the batch in hand')
    signals.interrupted = true
    obs.draining()
    stop.abort()
  }
  process.on('SIGINT', onSignal)
  process.on('SIGTERM', onSignal)
  let rt: Runtime | undefined
  try {
    rt = await openRuntime(config, log, {
      name,
      signal: stop.signal,
      // Services (run, clock, start) create a missing database; one-shot commands but setup do not.
      createDatabase: opts.createDatabase ?? opts.timeoutSeconds === undefined,
      ...(opts.timeoutSeconds !== undefined ? { timeoutMs: opts.timeoutSeconds * 1000 } : {}),
      ...(opts.nats !== undefined ? { nats: opts.nats } : {}),
      ...(opts.postgres !== undefined ? { postgres: opts.postgres } : {}),
    })
    await obs.attach(rt)
    await body(rt, stop.signal, obs)
  } catch (err) {
    if (stop.signal.aborted && rt === undefined) {
      // A service told to stop before it started has done what it was told; a one-shot command
      // has not: it exits 130.
      if (opts.timeoutSeconds === undefined) return
      throw new Error('interrupted while waiting for NATS or PostgreSQL', { cause: err })
    }
    throw err
  } finally {
    await obs.close()
    await rt?.close()
    log.flush()
  }
}

interface RuntimeOptions {
  logLevel?: string
  serve?: boolean
  /** A one-shot command: give up waiting for NATS or PostgreSQL after this long. */
  timeoutSeconds?: number
  /** Connect to NATS (default true). */
  nats?: boolean
  /** Connect to PostgreSQL (default true). */
  postgres?: boolean
  /** Create a missing database (default: the services do, one-shot commands do not). */
  createDatabase?: boolean
}

/**
 * {@link withRuntime} for a one-shot command: it connects to what it uses only, gives up after
 * `--timeout` seconds waiting for it, and exits 130 when interrupted while waiting.
 */
async function oneShot(
  name: string,
  opts: { timeout: number } & Pick<RuntimeOptions, 'nats' | 'postgres' | 'createDatabase'>,
  body: (rt: Runtime, signal: AbortSignal) => Promise<void>,
): Promise<void> {
  await withRuntime(name, body, {
    timeoutSeconds: opts.timeout,
    ...(opts.nats !== undefined ? { nats: opts.nats } : {}),
    ...(opts.postgres !== undefined ? { postgres: opts.postgres } : {}),
    ...(opts.createDatabase !== undefined ? { createDatabase: opts.createDatabase } : {}),
  })
}

/** The streams of setUp only, waited for the same way (for `simulate`, which has no database). */
async function setUpStreams(rt: Runtime, signal: AbortSignal): Promise<void> {
  await withBackoff(rt.log, 'set up streams', {
    isPermanent: (err) => !isTransient(err),
  }).execute(() => ensureStreams(rt.jsm, rt.config.streams), signal)
}

/**
 * Like {@link withRuntime} for commands that read NATS only (the `events` commands): they need no
 * database, so they still work while Postgres is down.
 */
async function withNats(
  name: string,
  timeoutSeconds: number,
  body: (src: EventsSource, signal: AbortSignal) => Promise<void>,
): Promise<void> {
  const config = loadConfig()
  const log = createLogger({ level: config.logLevel, name, destination: terminalLogs() })
  const stop = new AbortController()
  const onSignal = (sig: NodeJS.Signals) => {
    if (stop.signal.aborted) process.exit(130)
    log.info({ signal: sig }, 'stopping')
    signals.interrupted = true
    stop.abort()
  }
  process.on('SIGINT', onSignal)
  process.on('SIGTERM', onSignal)
  let src: Awaited<ReturnType<typeof openEventsSource>> | undefined
  try {
    const deadline = Date.now() + timeoutSeconds * 1000
    src = await openEventsSource(config, log, { name, signal: stop.signal, deadline }).catch(
      (err: unknown) => {
        if (Date.now() < deadline || stop.signal.aborted || err instanceof ConfigError) throw err
        throw new UnreachableError(
          `cannot reach NATS at ${redact(config.natsUrl)} within ${timeoutSeconds} s: ${errorSummary(err)}`,
          { cause: err },
        )
      },
    )
    await body(src, stop.signal)
  } catch (err) {
    if (stop.signal.aborted && src === undefined) {
      throw new Error('interrupted while waiting for NATS', { cause: err })
    }
    throw err
  } finally {
    await src?.close()
    log.flush()
  }
}

/** `--timeout` of a one-shot command. */
function timeoutOption(what = 'NATS and PostgreSQL'): Option {
  return new Option('--timeout <seconds>', `give up waiting for ${what} after this long`)
    .argParser(positive)
    .default(10)
}

async function waitForAbort(signal: AbortSignal): Promise<void> {
  if (!signal.aborted) await once(signal, 'abort')
}

function processorName(v: string): ProcessorName {
  if (!(PROCESSOR_NAMES as readonly string[]).includes(v)) {
    throw new InvalidArgumentError(`must be one of ${PROCESSOR_NAMES.join(', ')}, got '${v}'`)
  }
  return v as ProcessorName
}

function positiveInteger(v: string): number {
  const n = Number(v)
  if (!Number.isSafeInteger(n) || n < 1)
    throw new InvalidArgumentError(`must be an integer >= 1, got '${v}'`)
  return n
}

function nonNegativeInteger(v: string): number {
  const n = Number(v)
  if (v.trim() === '' || !Number.isSafeInteger(n) || n < 0)
    throw new InvalidArgumentError(`must be an integer >= 0, got '${v}'`)
  return n
}

function positive(v: string): number {
  const n = Number(v)
  if (!Number.isFinite(n) || n <= 0)
    throw new InvalidArgumentError(`must be a number > 0, got '${v}'`)
  return n
}

function nonNegative(v: string): number {
  const n = Number(v)
  if (!Number.isFinite(n) || n < 0)
    throw new InvalidArgumentError(`must be a number >= 0, got '${v}'`)
  return n
}

function ratio(v: string): number {
  const n = Number(v)
  if (!Number.isFinite(n) || n < 0 || n > 1)
    throw new InvalidArgumentError(`must be a number in [0, 1], got '${v}'`)
  return n
}

try {
  await withUsageHints(program).parseAsync()
} catch (err) {
  if (
    err instanceof ConfigError ||
    err instanceof ReplayUsageError ||
    err instanceof RebuildRefusedError ||
    err instanceof InvalidArgumentError ||
    err instanceof AlertCommandError ||
    err instanceof DlqCommandError ||
    err instanceof DevicesCommandError ||
    // Not found, and a stream set up with other settings, are answers too (README, exit codes).
    err instanceof EventNotFoundError ||
    err instanceof StreamConflictError
  ) {
    console.error(`fleetstream: ${redact(err.message)}`)
    if (err instanceof InvalidArgumentError && usageHint()) console.error(usageHint())
    process.exitCode = EXIT_USAGE
  } else if (signals.interrupted) {
    console.error(`fleetstream: ${redact(errorSummary(err))}`)
    process.exitCode = EXIT_INTERRUPTED
  } else if (err instanceof CommanderError) {
    // commander has printed it; help and --version end here too, with 0
    process.exitCode = err.exitCode === 0 ? 0 : EXIT_USAGE
  } else if (
    err instanceof EventsCommandError ||
    err instanceof DatabaseMissingError ||
    err instanceof UnreachableError
  ) {
    console.error(`fleetstream: ${redact(err.message)}`)
    process.exitCode = EXIT_FAILED
  } else {
    console.error(`fleetstream: ${redact(errorSummary(err))}`)
    process.exitCode = EXIT_FAILED
  }
}
