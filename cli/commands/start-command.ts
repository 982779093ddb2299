/**
 * `fleetstream start`, the main job: set up, run every processor, a clock and a simulated fleet in
 * one process, with live progress until Ctrl-C (or until the fleet's --duration is over and the
 * processors caught up).
 */
import { Command } from 'commander'
import { clockFor, startClock } from '../../app/clocks.ts'
import { setUp } from '../../app/runtime.ts'
import { createPublisher } from '../../infra/publisher.ts'
import { redact } from '../../infra/redact.ts'
import { ensureMqttMessagesStream } from '../../infra/streams.ts'
import { startProcessor } from '../../processors/runner/runner.ts'
import { simulateFleet } from '../../simulator/fleet.ts'
import { withRuntime } from '../command-process.ts'
import { JSON_HELP } from '../json-output.ts'
import { startProgress } from '../progress.ts'
import { printJsonLine, printSummary, startedLine, startJsonProgress } from '../start-output.ts'
import { simulation, withSimulationOptions, type SimulateFlags } from './simulate-command.ts'

export function startCommand(): Command {
  return withSimulationOptions(
    new Command('start')
      .description(
        'the main job: set up, run every processor and a simulated fleet, show live progress until Ctrl-C',
      )
      .option(
        '--json',
        JSON_HELP.lines('step of the run (started, progress each second, finished)'),
      ),
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
}
