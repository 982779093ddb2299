/**
 * The processors fleetstream runs, by name (their specs are the *-processor.ts files beside it).
 */
import type { Config } from '../infra/config.ts'
import type { ProcessorSpec } from './runner/types.ts'

/** Every processor fleetstream runs. */
export const PROCESSOR_NAMES = ['sensor-status', 'readings', 'alerts'] as const
export type ProcessorName = (typeof PROCESSOR_NAMES)[number]

/**
 * The specs of the processors a process uses, built when asked for. Each spec's module (and what
 * only it needs) is imported here, not at start-up: the bundle (cli/fleetstream.ts) keeps them in
 * chunks of their own, so a process running readings alone neither parses the alerts projection
 * nor the YAML parser, nor reads the alert rules file (~30 ms of CPU, and the `yaml` package is
 * an eighth of the bundle).
 */
const BUILD: Record<ProcessorName, (config: Config) => Promise<ProcessorSpec>> = {
  'sensor-status': async (config) =>
    (await import('./sensor-status-processor.ts')).sensorStatusProcessor(config),
  readings: async () => (await import('./readings-processor.ts')).readingsProcessor,
  alerts: async (config) => {
    const [{ alertsProcessor }, { defaultAlertRulesPath, loadAlertRules }] = await Promise.all([
      import('./alerts-processor.ts'),
      import('../infra/alert-rules-file.ts'),
    ])
    const rules = await loadAlertRules(config.alertRulesFile ?? defaultAlertRulesPath())
    return alertsProcessor(config, rules)
  },
}

/**
 * The processors configured for this run: those named in `only` (default: all of them), the
 * alerts processor's rules file read and validated if it is among them. A processor left out is
 * not enumerable (Object.values/keys list the loaded ones) and throws when asked for by name: a
 * command that uses a processor must name it.
 */
export async function loadProcessors(
  config: Config,
  only: readonly ProcessorName[] = PROCESSOR_NAMES,
): Promise<Readonly<Record<ProcessorName, ProcessorSpec>>> {
  const names = PROCESSOR_NAMES.filter((n) => only.includes(n))
  const specs = await Promise.all(names.map((n) => BUILD[n](config)))
  const out = {} as Record<ProcessorName, ProcessorSpec>
  for (const name of PROCESSOR_NAMES) {
    const i = names.indexOf(name)
    const spec = specs[i]
    if (spec !== undefined) {
      out[name] = spec
    } else {
      Object.defineProperty(out, name, {
        enumerable: false,
        get(): never {
          throw new Error(`the ${name} processor is not loaded in this process`)
        },
      })
    }
  }
  return Object.freeze(out)
}
