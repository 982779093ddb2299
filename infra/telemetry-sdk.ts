/**
 * The OpenTelemetry SDK of a process that records traces: loaded by `startTelemetry`
 * (infra/telemetry.ts) only when the environment asks for traces, since its module tree costs
 * seconds of start-up on a busy machine.
 */
import {
  context,
  diag,
  DiagLogLevel,
  trace,
  type Context,
  type Span,
  type Tracer,
  type TracerProvider,
} from '@opentelemetry/api'
import { readFileSync } from 'node:fs'
import { hostname } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { PgInstrumentation } from '@opentelemetry/instrumentation-pg'
import { NodeSDK, resources, tracing } from '@opentelemetry/sdk-node'
// The SDK's own readers of the OTEL_* variables (exporter, protocol, sampler, limits), so that the
// processors' tracer providers export exactly as the process's does. Not re-exported by the
// package's index; the version is pinned and the OTLP test fails if they move.
import {
  createSamplerFromEnv,
  createSpanLimitsFromEnv,
} from '@opentelemetry/sdk-node/build/src/create-from-env.js'
import { getSpanProcessorsFromEnv } from '@opentelemetry/sdk-node/build/src/utils.js'
import { Attr } from './span-attributes.ts'

export interface TelemetryOptions {
  /** `service.name` unless `OTEL_SERVICE_NAME` says otherwise. */
  readonly serviceName: string
  /** Tests: where spans go instead of the exporter the environment names. */
  readonly spanProcessors?: tracing.SpanProcessor[]
  readonly env?: NodeJS.ProcessEnv
}

/** Starts the SDK with the pg instrumentation and a tracer provider per processor. */
export function startSdk(
  opts: TelemetryOptions,
  env: NodeJS.ProcessEnv,
): { services: ServiceProviders; shutdown: () => Promise<void> } {
  // The SDK's own complaints (an unreachable collector) go to stderr as warnings, not crashes.
  const complain = (m: string, ...a: unknown[]) => {
    process.stderr.write(`otel: ${[m, ...a.map(String)].join(' ')}\n`)
  }
  diag.setLogger(
    {
      error: complain,
      warn: complain,
      info: () => undefined,
      debug: () => undefined,
      verbose: () => undefined,
    },
    DiagLogLevel.WARN,
  )
  const serviceName = env.OTEL_SERVICE_NAME ?? opts.serviceName
  // Host, process and OTEL_RESOURCE_ATTRIBUTES, as the SDK would detect them, shared by every
  // provider of the process.
  const resource = resources
    .defaultResource()
    .merge(
      resources.resourceFromAttributes({
        'service.version': packageVersion(),
        'service.instance.id': `${hostname()}-${String(process.pid)}`,
      }),
    )
    .merge(
      resources.detectResources({
        detectors: [resources.envDetector, resources.processDetector, resources.hostDetector],
      }),
    )
  // One set of span processors (the exporter the environment names) for every provider.
  const spanProcessors = opts.spanProcessors ?? getSpanProcessorsFromEnv(undefined)
  // A batch span links to every event of the batch (up to PROCESSOR_BATCH_SIZE); the SDK's
  // default keeps 128 links.
  const spanLimits = {
    ...createSpanLimitsFromEnv(),
    ...(env.OTEL_SPAN_LINK_COUNT_LIMIT ? {} : { linkCountLimit: 10_000 }),
  }
  const sampler = createSamplerFromEnv()
  // Database spans only beneath a fleetstream span, not for every pool health check.
  const pg = new PgInstrumentation({ requireParentSpan: true })
  const sdk = new NodeSDK({
    serviceName,
    resource,
    autoDetectResources: false,
    spanProcessors,
    spanLimits,
    ...(sampler ? { sampler } : {}),
    // Traces only: metrics are served in Prometheus format, logs go to stderr as JSON.
    metricReaders: [],
    logRecordProcessors: [],
    instrumentations: [pg],
  })
  sdk.start()
  const services = new ServiceProviders(
    resource,
    env.OTEL_SERVICE_NAME,
    spanProcessors,
    spanLimits,
    sampler,
  )
  pg.setTracerProvider(services.routing)
  return {
    services,
    shutdown: () =>
      sdk.shutdown().catch((err: unknown) => {
        complain(`shutdown: ${err instanceof Error ? err.message : String(err)}`)
      }),
  }
}

/**
 * A tracer provider per processor, and a provider for instrumentations that puts a span in the
 * provider (so the service) of the span it starts under.
 */
class ServiceProviders {
  readonly #providers = new Map<string, tracing.BasicTracerProvider>()
  /** The provider each span of a processor was started by. */
  readonly #owners = new WeakMap<Span, TracerProvider>()

  constructor(
    readonly resource: resources.Resource,
    readonly serviceName: string | undefined,
    readonly spanProcessors: tracing.SpanProcessor[],
    readonly spanLimits: tracing.SpanLimits,
    readonly sampler: tracing.Sampler | undefined,
  ) {}

  tracer(processor: string): Tracer {
    let provider = this.#providers.get(processor)
    if (!provider) {
      const owners = this.#owners
      const owner: tracing.SpanProcessor = {
        onStart: (span) => {
          owners.set(span, created)
        },
        onEnd: () => undefined,
        forceFlush: () => Promise.resolve(),
        shutdown: () => Promise.resolve(),
      }
      const created: tracing.BasicTracerProvider = new tracing.BasicTracerProvider({
        resource: this.resource.merge(
          resources.resourceFromAttributes({
            'service.name': this.serviceName ?? `fleetstream-${processor}`,
            [Attr.Processor]: processor,
          }),
        ),
        spanLimits: this.spanLimits,
        ...(this.sampler ? { sampler: this.sampler } : {}),
        spanProcessors: [owner, ...this.spanProcessors],
      })
      provider = created
      this.#providers.set(processor, provider)
    }
    return provider.getTracer('fleetstream')
  }

  readonly routing: TracerProvider = {
    getTracer: (name, version, options) => {
      const pick = (ctx: Context): Tracer => {
        const parent = trace.getSpan(ctx)
        const provider = (parent && this.#owners.get(parent)) ?? trace.getTracerProvider()
        return provider.getTracer(name, version, options)
      }
      const startActiveSpan = (spanName: string, ...rest: unknown[]): unknown => {
        // (name, fn), (name, options, fn) or (name, options, context, fn)
        const ctx = rest.length >= 3 ? (rest[1] as Context) : context.active()
        const t = pick(ctx) as unknown as { startActiveSpan(...a: unknown[]): unknown }
        return t.startActiveSpan(spanName, ...rest)
      }
      return {
        startSpan: (spanName, spanOptions, ctx) =>
          pick(ctx ?? context.active()).startSpan(spanName, spanOptions, ctx),
        startActiveSpan,
      }
    },
  }
}

/** `version` of fleetstream's package.json (above this file, in the sources and in dist/). */
function packageVersion(): string {
  let dir = dirname(fileURLToPath(import.meta.url))
  for (;;) {
    try {
      const pkg = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as {
        name?: unknown
        version?: unknown
      }
      if (pkg.name === 'fleetstream' && typeof pkg.version === 'string') return pkg.version
    } catch {
      // no package.json here
    }
    const parent = dirname(dir)
    if (parent === dir) return 'unknown'
    dir = parent
  }
}
