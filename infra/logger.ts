import { pino, type Logger } from 'pino'

export type { Logger }

/**
 * Structured JSON logs on stderr (stdout stays free for command output).
 *
 * ```ts
 * const log = createLogger({ level: config.logLevel, name: 'readings' })
 * log.warn({ eventId, reason }, 'event parked in the DLQ')
 * ```
 */
export function createLogger(opts: { level: string; name?: string }): Logger {
  return pino(
    {
      level: opts.level,
      base: opts.name ? { name: opts.name } : {},
      timestamp: pino.stdTimeFunctions.isoTime,
    },
    pino.destination({ dest: 2, sync: true }),
  )
}
