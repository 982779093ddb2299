/**
 * The services: `fleetstream run [processor...]` (processors and a clock) and `fleetstream clock`
 * (the clock alone), each until SIGINT/SIGTERM.
 */
import { once } from 'node:events'
import { Command } from 'commander'
import { startClock } from '../../app/clocks.ts'
import { setUp } from '../../app/runtime.ts'
import { PROCESSOR_NAMES } from '../../processors/processor-registry.ts'
import { startProcessor } from '../../processors/runner/runner.ts'
import { withRuntime } from '../command-process.ts'
import { ALERTS_HEAP_GROWING_PERCENT, capHeapGrowth } from '../heap-growth.ts'
import { selectProcessors } from '../options.ts'

export function runCommand(): Command {
  return new Command('run')
    .description('run processors until SIGINT/SIGTERM (all of them when none is named)')
    .argument('[processor...]', `processors to run: ${PROCESSOR_NAMES.join(', ')}`)
    .option('--no-clock', 'do not publish clock ticks from this process')
    .action(async (names: string[], opts: { clock: boolean }) => {
      const selected = selectProcessors(names)
      if (selected.includes('alerts')) capHeapGrowth(ALERTS_HEAP_GROWING_PERCENT)
      await withRuntime(
        'fleetstream-run',
        async (rt, signal, obs) => {
          await setUp(rt, signal, { consumers: false, layout: 'newest' })
          const running = selected.map((name) =>
            startProcessor(rt.processors[name], { ...rt, metrics: obs.metrics }),
          )
          const clock = opts.clock ? startClock(rt, signal) : Promise.resolve()
          if (!signal.aborted) await once(signal, 'abort')
          await Promise.all([...running.map((p) => p.stop()), clock])
        },
        { serve: true, processors: selected },
      )
    })
}

export function clockCommand(): Command {
  return new Command('clock')
    .description(
      'publish clock ticks into the stream until SIGINT/SIGTERM (run and start include one)',
    )
    .action(async () => {
      await withRuntime('fleetstream-clock', async (rt, signal) => {
        await setUp(rt, signal)
        await startClock(rt, signal)
      })
    })
}
