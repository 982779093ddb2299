/** `fleetstream dlq list|show|redrive`: inspect and redrive the events parked in FLEET_DLQ. */
import { Command, Option } from 'commander'
import { EXIT_FAILED } from '../exit-codes.ts'
import { PROCESSOR_NAMES, type ProcessorName } from '../../processors/processor-registry.ts'
import { oneShot } from '../command-process.ts'
import { dlqDepth, listDlq, showDlq } from '../../processors/dlq/inspect.ts'
import { redriveDlq } from '../../processors/dlq/redrive.ts'
import { formatDlqTable } from '../dlq-table.ts'
import { JSON_HELP } from '../json-output.ts'
import { positive, positiveInteger, timeoutOption, UsageError } from '../options.ts'
import { fmt, progressBar } from '../progress.ts'
import { columnsOf } from '../terminal.ts'

interface RedriveFlags {
  seq?: number[]
  all?: boolean
  processor?: ProcessorName
  rate: number
  json?: boolean
  timeout: number
}

export function dlqCommand(): Command {
  const dlq = new Command('dlq').description('inspect and redrive events parked in FLEET_DLQ')

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
      new Option('--rate <events/s>', 'at most this many per second')
        .argParser(positive)
        .default(50),
    )
    .option('--json', JSON_HELP.array('entries redriven'))
    .addOption(timeoutOption('NATS'))
    .action(async (opts: RedriveFlags) => {
      if ((opts.seq === undefined) === (opts.all !== true)) {
        throw new UsageError(`give exactly one of '--seq <n...>' and '--all'`)
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
    })
  return dlq
}
