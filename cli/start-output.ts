/** What `start` prints: its `--json` lines, the summary at the end and the commands to look further. */
import type { Config } from '../infra/config.ts'
import type { Publisher } from '../infra/publisher.ts'
import { redact } from '../infra/redact.ts'
import type { RunningProcessor } from '../processors/runner/types.ts'
import { shellUrl } from './copy-paste.ts'
import { fmt, type Progress } from './progress.ts'
import type { Runtime } from '../app/runtime.ts'
import { startSampler, type StartSample } from './start-sampler.ts'

/**
 * The nats CLI context the commands `start` prints use when NATS wants a login: saved once with
 * the command README.md ("Inspect with the nats CLI") gives, so no password is ever printed.
 */
export const NATS_CONTEXT = 'fleetstream'

/**
 * The commands `start` prints to look at what it wrote. Each runs as printed in a new shell: a
 * URL that holds a secret is referenced as the variable README.md says to export
 * (`DATABASE_URL`, `NATS_PASSWORD`), never printed; the nats commands of a server that wants a
 * login go through the saved context {@link NATS_CONTEXT}.
 */
export function followUpCommands(config: Config): string[] {
  const psql = `psql ${shellUrl('DATABASE_URL', config.databaseUrl)}`
  const natsServer = shellUrl('NATS_URL', config.natsUrl)
  const nats = config.natsAuth
    ? `nats --context ${NATS_CONTEXT}`
    : [
        `nats --server ${natsServer}`,
        ...(config.natsInboxPrefix !== '_INBOX'
          ? [`--inbox-prefix ${config.natsInboxPrefix}`]
          : []),
      ].join(' ')
  const { events } = config.streams
  return [
    'Query what it wrote:',
    `  ${psql} -c "select status, count(*) from sensor_status group by status"`,
    `  ${psql} -c "select device_id, metric, value, unit, occurred_at from latest_readings order by device_id, metric limit 20"`,
    `  ${psql} -c "select severity, state, count(*) from alerts group by 1, 2 order by 1, 2"`,
    '  npm run -s fleetstream -- alerts list --state open',
    'Inspect the stream (nats CLI):',
    ...(config.natsAuth
      ? [
          `  nats context save ${NATS_CONTEXT} --server ${natsServer} --user ${config.natsAuth.user} --password "$NATS_PASSWORD"` +
            `${config.natsInboxPrefix !== '_INBOX' ? ` --inbox-prefix ${config.natsInboxPrefix}` : ''}   # once`,
        ]
      : []),
    `  ${nats} stream info ${events}`,
    `  ${nats} stream view ${events} --subject 'fleet.events.*.reading'`,
    `  ${nats} consumer report ${events}`,
  ]
}

/** The summary `start` prints when it ends, for people. */
export function printSummary(
  rt: Runtime,
  running: readonly RunningProcessor[],
  published: { published: number; duplicates: number },
): void {
  const lines = [
    '',
    `published ${fmt(published.published)} events (${fmt(published.duplicates)} re-sends refused as duplicates by the stream)`,
    ...running.map(
      (p) =>
        `processor ${p.name}: applied ${fmt(p.stats.applied)}, refused ${fmt(p.stats.rejected)}, checkpoint at stream sequence ${fmt(p.stats.checkpoint)}`,
    ),
    '',
    ...followUpCommands(rt.config),
  ]
  console.log(lines.join('\n'))
}

/** One line of `start --json` (JSON lines on stdout). */
export type StartLine =
  | {
      type: 'started'
      nats: string
      postgres: string
      streams: Record<string, string>
      metrics: string | null
    }
  | ({ type: 'progress'; at: string; ratePerSecond: number } & Totals)
  | ({ type: 'finished'; at: string } & Totals)

interface Totals {
  published: number
  duplicates: number
  processors: {
    name: string
    applied: number
    refused: number
    checkpoint: number
    lag: number | null
    state: string
  }[]
}

export function printJsonLine(line: StartLine): void {
  console.log(JSON.stringify(line))
}

/** `start --json`'s counterpart of the live line: a `progress` line every second, then `finished`. */
export function startJsonProgress(
  rt: Runtime,
  running: readonly RunningProcessor[],
  publisher: Publisher,
): Progress {
  const totals = (lags: StartSample['lags']): Totals => ({
    published: publisher.stats.published,
    duplicates: publisher.stats.duplicates,
    processors: running.map((p) => ({
      name: p.name,
      applied: p.stats.applied,
      refused: p.stats.rejected,
      checkpoint: p.stats.checkpoint,
      lag: lags.get(p.name) ?? null,
      state: p.stats.state,
    })),
  })
  const sampler = startSampler(rt, running, publisher, ({ lags, rate }) => {
    printJsonLine({
      type: 'progress',
      at: new Date().toISOString(),
      ratePerSecond: Math.round(rate),
      ...totals(lags),
    })
  })
  return {
    note(text) {
      process.stderr.write(`${text}\n`) // stdout holds only the JSON lines
    },
    caughtUp: (signal) => sampler.caughtUp(signal),
    async stop() {
      const { lags } = await sampler.stop()
      printJsonLine({ type: 'finished', at: new Date().toISOString(), ...totals(lags) })
    },
  }
}

/** The first line of `start --json`. */
export function startedLine(
  config: Config,
  streams: Record<string, string>,
  metrics: string | undefined,
): StartLine {
  return {
    type: 'started',
    nats: redact(config.natsUrl),
    postgres: redact(config.databaseUrl),
    streams,
    metrics: metrics ?? null,
  }
}
