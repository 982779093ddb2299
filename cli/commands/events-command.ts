/** `fleetstream events tail|show`: FLEET_EVENTS as it is stored, read over NATS only. */
import { Command, Option } from 'commander'
import type { EventKind } from '../../schemas/events.ts'
import { withNats } from '../command-process.ts'
import { formatEventLine } from '../event-line.ts'
import { JSON_HELP } from '../json-output.ts'
import {
  nonNegativeInteger,
  parseDeviceOption,
  parseSinceOption,
  positiveInteger,
  timeoutOption,
} from '../options.ts'
import { EVENT_KIND_NAMES, formatEvent, showEvent, tailEvents } from '../stored-events.ts'
import { columnsOf } from '../terminal.ts'

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

export function eventsCommand(): Command {
  const events = new Command('events').description(
    'inspect FLEET_EVENTS: follow events as they arrive, show one by stream sequence',
  )

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
  return events
}
