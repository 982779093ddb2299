import {
  context,
  diag,
  DiagLogLevel,
  propagation,
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
import type { MsgHdrs } from '@nats-io/transport-node'
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

/**
 * OpenTelemetry for one fleetstream process: W3C trace context through NATS headers, spans for
 * publishing and processing, and PostgreSQL spans from the pg instrumentation.
 *
 * Export follows the standard OpenTelemetry variables: tracing is on when
 * `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) or `OTEL_TRACES_EXPORTER`
 * is set (`console` prints spans, `otlp` posts them, `none` turns tracing off), and off when none
 * is: no exporter is started, nothing is sent and no error is ever raised for a missing
 * collector. `OTEL_SDK_DISABLED=true` turns it off too.
 *
 * Services: in OpenTelemetry the resource (`service.name`) belongs to a tracer provider, and one
 * process may run all three processors (`run`, `start`). So each processor gets a provider of its
 * own, `service.name` `fleetstream-<processor>` (with `fleetstream.processor` on the resource), and
 * the rest of the process (publisher, simulator, clock) is `fleetstream-<command>`; all of them
 * feed the same span processors, so one exporter. `OTEL_SERVICE_NAME`, when set, is every
 * provider's `service.name` (the processors keep `fleetstream.processor`). Every provider carries
 * `service.version` (package.json) and `service.instance.id` (`<host>-<pid>`). A pg span belongs
 * to the service of the span it runs under.
 *
 * Start it before anything imports `pg` (the instrumentation hooks the module as it loads):
 *
 * ```ts
 * const telemetry = startTelemetry({ serviceName: 'fleetstream-run' })
 * await import('./main.ts')
 * await telemetry.shutdown() // flushes spans still queued
 * ```
 */
export interface Telemetry {
  /** Whether spans are recorded and exported in this process. */
  readonly enabled: boolean
  /** Exports what is queued and stops; safe to call more than once. */
  shutdown(): Promise<void>
}

/**
 * The standard OpenTelemetry variables fleetstream documents and honours (README.md, "Traces");
 * the SDK reads them itself.
 */
export const OTEL_VARIABLES: readonly string[] = Object.freeze([
  'OTEL_SDK_DISABLED',
  'OTEL_SERVICE_NAME',
  'OTEL_RESOURCE_ATTRIBUTES',
  'OTEL_TRACES_EXPORTER',
  'OTEL_EXPORTER_OTLP_ENDPOINT',
  'OTEL_EXPORTER_OTLP_TRACES_ENDPOINT',
  'OTEL_EXPORTER_OTLP_PROTOCOL',
  'OTEL_TRACES_SAMPLER',
  'OTEL_TRACES_SAMPLER_ARG',
  'OTEL_SPAN_LINK_COUNT_LIMIT',
])

export interface TelemetryOptions {
  /** `service.name` unless `OTEL_SERVICE_NAME` says otherwise. */
  readonly serviceName: string
  /** Tests: where spans go instead of the exporter the environment names. */
  readonly spanProcessors?: tracing.SpanProcessor[]
  readonly env?: NodeJS.ProcessEnv
}

let active = false
/** The tracer provider of each processor, while telemetry is started. */
let services: ServiceProviders | undefined

/** Whether spans are recorded in this process: hot paths skip building them when not. */
export function tracingActive(): boolean {
  return active
}

export function startTelemetry(opts: TelemetryOptions): Telemetry {
  const env = opts.env ?? process.env
  if (opts.spanProcessors === undefined && !tracingRequested(env)) {
    return { enabled: false, shutdown: () => Promise.resolve() }
  }
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
  services = new ServiceProviders(
    resource,
    env.OTEL_SERVICE_NAME,
    spanProcessors,
    spanLimits,
    sampler,
  )
  pg.setTracerProvider(services.routing)
  active = true
  let stopped: Promise<void> | undefined
  return {
    enabled: true,
    // The processors' providers share the SDK's span processors: its shutdown flushes them all.
    shutdown: () =>
      (stopped ??= sdk
        .shutdown()
        .finally(() => {
          active = false
          services = undefined
        })
        .catch((err: unknown) => {
          complain(`shutdown: ${err instanceof Error ? err.message : String(err)}`)
        })),
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

function tracingRequested(env: NodeJS.ProcessEnv): boolean {
  if (env.OTEL_SDK_DISABLED?.trim().toLowerCase() === 'true') return false
  const exporters = (env.OTEL_TRACES_EXPORTER ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s !== '')
  if (exporters.includes('none')) return false
  return (
    exporters.length > 0 ||
    Boolean(env.OTEL_EXPORTER_OTLP_ENDPOINT) ||
    Boolean(env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
  )
}

/**
 * The tracer of fleetstream spans (a no-op until telemetry is started): the processor's own
 * (its own service) when a processor is named, the process's otherwise.
 */
export function tracer(processor?: string): Tracer {
  if (processor !== undefined && services) return services.tracer(processor)
  return trace.getTracer('fleetstream')
}

/** Writes the trace context of `ctx` (W3C `traceparent`, `tracestate`) into NATS headers. */
export function injectTraceContext(ctx: Context, headers: MsgHdrs): void {
  propagation.inject(ctx, headers, {
    set: (carrier, key, value) => {
      carrier.set(key, value)
    },
  })
}

/** The trace context a message carries in its headers (the root context when it has none). */
export function extractTraceContext(headers: MsgHdrs | undefined): Context {
  if (!headers) return context.active()
  return propagation.extract(context.active(), headers, {
    get: (carrier, key) => {
      const v = carrier.get(key)
      return v === '' ? undefined : v
    },
    keys: (carrier) => carrier.keys(),
  })
}

/** Trace and span id of a span, in the field names the logs use. */
export function traceFields(span: Span | undefined): { traceId?: string; spanId?: string } {
  const sc = span?.spanContext()
  if (!sc || !trace.isSpanContextValid(sc)) return {}
  return { traceId: sc.traceId, spanId: sc.spanId }
}

/**
 * Span attribute names: OpenTelemetry messaging conventions where one exists, `fleetstream.*` for
 * the rest.
 */
export const Attr = {
  MessagingSystem: 'messaging.system',
  MessagingOperationType: 'messaging.operation.type',
  MessagingOperationName: 'messaging.operation.name',
  MessagingDestination: 'messaging.destination.name',
  MessagingConsumerGroup: 'messaging.consumer.group.name',
  MessagingMessageId: 'messaging.message.id',
  MessagingConversationId: 'messaging.message.conversation_id',
  MessagingBodySize: 'messaging.message.body.size',
  MessagingBatchCount: 'messaging.batch.message_count',
  StreamSequence: 'fleetstream.stream.sequence',
  DeliveryCount: 'fleetstream.delivery.count',
  DeviceId: 'fleetstream.device.id',
  CorrelationId: 'fleetstream.correlation.id',
  Hlc: 'fleetstream.hlc',
  EventType: 'fleetstream.event.type',
  Processor: 'fleetstream.processor',
  Duplicate: 'fleetstream.duplicate',
  Outcome: 'fleetstream.outcome',
  DlqReason: 'fleetstream.dlq.reason',
} as const
