/**
 * The processors fleetstream runs, by name (their specs are the *-processor.ts files beside it).
 */
import { defaultAlertRulesPath, loadAlertRules } from '../infra/alert-rules-file.ts'
import type { Config } from '../infra/config.ts'
import { alertsProcessor } from './alerts-processor.ts'
import type { ProcessorSpec } from './runner/types.ts'
import { readingsProcessor } from './readings-processor.ts'
import { sensorStatusProcessor } from './sensor-status-processor.ts'

/** Every processor fleetstream runs. */
export const PROCESSOR_NAMES = ['sensor-status', 'readings', 'alerts'] as const
export type ProcessorName = (typeof PROCESSOR_NAMES)[number]

/** The processors configured for this run (reads and validates the alert rules file). */
export async function loadProcessors(
  config: Config,
): Promise<Record<ProcessorName, ProcessorSpec>> {
  const rules = await loadAlertRules(config.alertRulesFile ?? defaultAlertRulesPath())
  return {
    'sensor-status': sensorStatusProcessor(config),
    readings: readingsProcessor,
    alerts: alertsProcessor(config, rules),
  }
}
