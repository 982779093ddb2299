import {
  context,
  diag,
  DiagLogLevel,
  propagation,
  trace,
  type Context,
  type Span,
  type Tracer,
} from '@opentelemetry/api'
import type { MsgHdrs } from '@nats-io/transport-node'
import { PgInstrumentation } from '@opentelemetry/instrumentation-pg'
import { NodeSDK, type tracing } from '@opentelemetry/sdk-node'

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
  const sdk = new NodeSDK({
    serviceName: env.OTEL_SERVICE_NAME ?? opts.serviceName,
    ...(opts.spanProcessors ? { spanProcessors: opts.spanProcessors } : {}),
    // Traces only: metrics are served in Prometheus format, logs go to stderr as JSON.
    metricReaders: [],
    logRecordProcessors: [],
    // A batch span links to every event of the batch (up to PROCESSOR_BATCH_SIZE); the SDK's
    // default keeps 128 links.
    ...(env.OTEL_SPAN_LINK_COUNT_LIMIT ? {} : { spanLimits: { linkCountLimit: 10_000 } }),
    // Database spans only beneath a fleetstream span, not for every pool health check.
    instrumentations: [new PgInstrumentation({ requireParentSpan: true })],
  })
  sdk.start()
  active = true
  let stopped: Promise<void> | undefined
  return {
    enabled: true,
    shutdown: () =>
      (stopped ??= sdk
        .shutdown()
        .finally(() => (active = false))
        .catch((err: unknown) => {
          complain(`shutdown: ${err instanceof Error ? err.message : String(err)}`)
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

/** The tracer of every fleetstream span (a no-op until telemetry is started). */
export function tracer(): Tracer {
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
