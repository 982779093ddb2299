import {
  context,
  propagation,
  trace,
  type Context,
  type Span,
  type Tracer,
} from '@opentelemetry/api'
import type { MsgHdrs } from '@nats-io/transport-node'
import type { TelemetryOptions } from './telemetry-sdk.ts'

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

let active = false
/** The tracer provider of each processor, while telemetry is started. */
let services: { tracer(processor: string): Tracer } | undefined

/** Whether spans are recorded in this process: hot paths skip building them when not. */
export function tracingActive(): boolean {
  return active
}

/**
 * Starts telemetry when the environment asks for traces. The SDK (a large module tree: seconds of
 * start-up on a busy machine) is loaded only then, so a process without tracing never pays for it.
 */
export async function startTelemetry(opts: TelemetryOptions): Promise<Telemetry> {
  const env = opts.env ?? process.env
  if (opts.spanProcessors === undefined && !tracingRequested(env)) {
    return { enabled: false, shutdown: () => Promise.resolve() }
  }
  const { startSdk } = await import('./telemetry-sdk.ts')
  const started = startSdk(opts, env)
  services = started.services
  active = true
  let stopped: Promise<void> | undefined
  return {
    enabled: true,
    // The processors' providers share the SDK's span processors: its shutdown flushes them all.
    shutdown: () =>
      (stopped ??= started.shutdown().finally(() => {
        active = false
        services = undefined
      })),
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
