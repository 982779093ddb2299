#!/usr/bin/env node
/**
 * The `fleetstream` binary. Telemetry starts first: the pg instrumentation hooks `pg` as it loads,
 * so the commands (and everything that imports `pg`) are loaded only after it.
 *
 * `npm run build` bundles it (esbuild, `npm run bundle` in package.json) over tsc's
 * dist/cli/fleetstream.js: loading ~600 module files cost a processor ~0.55 s of CPU of the ~1.5 s
 * before its first applied batch, one bundle ~0.23 s. The commands are a chunk of their own
 * (dist/cli/chunks/), still imported after telemetry starts; `pg` and `@opentelemetry/*` stay
 * outside the bundle so that the instrumentation can hook `pg` as it loads; pino-pretty and
 * cli-progress are required lazily from node_modules (cli/terminal.ts).
 */
import nodeModule from 'node:module'
import { startTelemetry } from '../infra/telemetry.ts'

// From Node 22.1 on (the image's Node 24), V8 keeps the code it compiled for the bundle on disk
// (in the OS's temp dir) and the next process reuses it; Node 20 has no such cache.
;(nodeModule as { enableCompileCache?: () => unknown }).enableCompileCache?.()

const command = process.argv.slice(2).find((a) => !a.startsWith('-')) ?? 'cli'
const telemetry = await startTelemetry({ serviceName: `fleetstream-${command}` })
try {
  await import('./main.ts')
} finally {
  await telemetry.shutdown()
}
