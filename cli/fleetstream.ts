#!/usr/bin/env node
/**
 * The `fleetstream` binary. Telemetry starts first: the pg instrumentation hooks `pg` as it loads,
 * so the commands (and everything that imports `pg`) are loaded only after it.
 */
import { startTelemetry } from '../infra/telemetry.ts'

const command = process.argv.slice(2).find((a) => !a.startsWith('-')) ?? 'cli'
const telemetry = await startTelemetry({ serviceName: `fleetstream-${command}` })
try {
  await import('./main.ts')
} finally {
  await telemetry.shutdown()
}
