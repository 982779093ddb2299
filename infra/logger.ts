import { trace } from '@opentelemetry/api'
import { pino, type DestinationStream, type Logger } from 'pino'
import { redact } from './redact.ts'

export type { Logger }

/**
 * Structured JSON logs on stderr (stdout stays free for command output), with the trace and span
 * id of the active span when tracing is on. A `destination` takes the lines instead (the CLI
 * prettifies them on a terminal: cli/terminal.ts).
 *
 * ```ts
 * const log = createLogger({ level: config.logLevel, name: 'readings' })
 * log.warn({ eventId, reason }, 'event parked in the DLQ')
 * ```
 */
export function createLogger(opts: {
  level: string
  name?: string
  destination?: DestinationStream | undefined
}): Logger {
  return pino(
    {
      level: opts.level,
      base: opts.name ? { name: opts.name } : {},
      timestamp: pino.stdTimeFunctions.isoTime,
      // Lines written inside a span (a batch, a publish) carry its ids, so a log line leads to its
      // trace in Jaeger; fields the call passes (an event's own trace) take precedence.
      // Whatever a line carries (an error quoting a URL, say), no secret leaves the process.
      hooks: { streamWrite: (line) => redact(line) },
      mixin: () => {
        const sc = trace.getActiveSpan()?.spanContext()
        return sc && trace.isSpanContextValid(sc) ? { traceId: sc.traceId, spanId: sc.spanId } : {}
      },
    },
    opts.destination ?? pino.destination({ dest: 2, sync: true }),
  )
}
