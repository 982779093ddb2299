#!/usr/bin/env -S node --max-semi-space-size=4
/**
 * The `fleetstream` binary.
 *
 * Node starts it with `--max-semi-space-size=4` (this shebang, the image's ENTRYPOINT, the
 * package.json scripts and the bench's spawn say it): V8's young generation grows to 2 x 16 MB of
 * semi-spaces by default, and a processor's batches of short-lived messages keep it there. With
 * 4 MB semi-spaces, peak RSS after 150k events of the 1M backlog went from 245 to 214 MB
 * (sensor-status), 187 to 163 (readings) and 295 to 267 (alerts), CPU within the noise. V8 sizes
 * the heap when the process starts, so the flag must be on the command line (or in
 * NODE_OPTIONS): `v8.setFlagsFromString` here is too late. The old generation's growth is
 * another matter: V8 reads that flag at every full GC, and `run` caps it for the alerts processor
 * alone (cli/heap-growth.ts).
 *
 * Telemetry starts first: the pg instrumentation hooks `pg` as it loads,
 * so the commands (and everything that imports `pg`) are loaded only after it.
 *
 * `npm run build` bundles it (esbuild, `npm run bundle` in package.json) over tsc's
 * dist/cli/fleetstream.js: loading ~600 module files cost a processor ~0.55 s of CPU of the ~1.5 s
 * before its first applied batch, one bundle ~0.23 s. The commands are a chunk of their own
 * (dist/cli/chunks/), still imported after telemetry starts; `pg` and the OpenTelemetry SDK and
 * pg instrumentation stay outside the bundle so that the instrumentation can hook `pg` as it
 * loads; pino-pretty and cli-progress are required lazily from node_modules (cli/terminal.ts).
 * `@opentelemetry/api` is in the bundle (loading its ~80 files from node_modules cost each process
 * ~60 ms of CPU): its copies share one global registry by design, so the SDK's copy and ours
 * see the same providers, context and propagators (test/tracing.e2e.test.ts).
 */
import nodeModule from 'node:module'
import { startTelemetry } from '../infra/telemetry.ts'

// From Node 22.1 on (the image's Node 24), V8 keeps the code it compiled for the bundle on disk
// (in the OS's temp dir) and the next process reuses it; Node 20 has no such cache.
;(nodeModule as { enableCompileCache?: () => unknown }).enableCompileCache?.()

const command = process.argv.slice(2).find((a) => !a.startsWith('-')) ?? 'cli'
const telemetry = await startTelemetry({ serviceName: `fleetstream-${command}` })
try {
  await loadPg()
  await import('./main.ts')
} finally {
  await telemetry.shutdown()
}

/**
 * Loads `pg` (after telemetry: see above). pg 8 asks as it loads whether it runs in a Cloudflare
 * Worker: where `navigator` is missing (Node 20; Node 21 on has one) it builds a `Response`, which
 * loads Node's whole fetch implementation (undici), ~40 ms of CPU per process for nothing. A
 * stand-in `navigator` is there while pg loads, and gone after.
 */
async function loadPg(): Promise<void> {
  if ('navigator' in globalThis) {
    await import('pg')
    return
  }
  Object.defineProperty(globalThis, 'navigator', {
    value: { userAgent: `Node.js/${process.versions.node}` },
    configurable: true,
  })
  try {
    await import('pg')
  } finally {
    delete (globalThis as { navigator?: unknown }).navigator
  }
}
