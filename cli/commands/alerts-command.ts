/**
 * `fleetstream alerts list|ack`: alerts from the read model, and an operator's acknowledgement
 * published as an event (so that it replays like everything else).
 */
import { Command, Option } from 'commander'
import { clockFor } from '../../app/clocks.ts'
import { oneShot } from '../command-process.ts'
import { JSON_HELP } from '../json-output.ts'
import { positiveInteger, timeoutOption } from '../options.ts'
import { OperatorError } from '../../schemas/errors.ts'
import type { Alert } from '../../projections/tables.ts'
import { createPublisher } from '../../infra/publisher.ts'
import type { HybridLogicalClock } from '../../schemas/hlc.ts'
import type { Runtime } from '../../app/runtime.ts'

export function alertsCommand(): Command {
  const alerts = new Command('alerts').description('list and acknowledge alerts')

  alerts
    .command('list')
    .description('alerts from the read model, most severe and newest first')
    .addOption(
      new Option('--state <state>', 'only this state').choices([
        'open',
        'acknowledged',
        'resolved',
      ]),
    )
    .addOption(
      new Option('--severity <severity>', 'only this severity').choices([
        'info',
        'warning',
        'critical',
      ]),
    )
    .option('--device <id>', 'only this sensor')
    .addOption(
      new Option('--limit <n>', 'at most this many').argParser(positiveInteger).default(100),
    )
    .option('--json', JSON_HELP.array('alerts'))
    .addOption(timeoutOption('PostgreSQL'))
    .action(async (opts: ListOptions & { json?: boolean; timeout: number }) => {
      await oneShot('fleetstream-alerts', { ...opts, nats: false }, async (rt) => {
        const rows = await listAlerts(rt, opts)
        if (opts.json) console.log(JSON.stringify(rows))
        else if (rows.length === 0) console.log('no alerts')
        else for (const a of rows) console.log(formatAlert(a))
      })
    })

  alerts
    .command('ack')
    .description('acknowledge an open alert: publishes an alert.acknowledged event into the stream')
    .argument('<alert-id>', 'the alert to acknowledge (see alerts list)')
    .requiredOption('--by <name>', 'who acknowledges it')
    .option('--note <text>', 'why, for the record')
    .option('--json', JSON_HELP.document('the result'))
    .addOption(timeoutOption())
    .action(
      async (
        alertId: string,
        opts: { by: string; note?: string; json?: boolean; timeout: number },
      ) => {
        await oneShot('fleetstream-alerts', opts, async (rt) => {
          const r = await acknowledgeAlert(
            rt,
            clockFor(rt.config, 'cli'),
            alertId,
            opts.by,
            opts.note,
          )
          if (opts.json) console.log(JSON.stringify({ alertId, eventId: r.eventId, seq: r.seq }))
          else
            console.log(
              `acknowledged ${alertId} (${r.alert.device_id}, ${r.alert.rule_id}): event ${r.eventId} at stream sequence ${r.seq}`,
            )
        })
      },
    )
  return alerts
}

interface ListOptions {
  readonly state?: Alert['state']
  readonly severity?: Alert['severity']
  readonly device?: string
  readonly limit: number
}

/** Alerts from the read model, most severe and newest first. */
export async function listAlerts(rt: Runtime, o: ListOptions): Promise<Alert[]> {
  let q = rt.db.selectFrom('alerts').selectAll()
  if (o.state) q = q.where('state', '=', o.state)
  if (o.severity) q = q.where('severity', '=', o.severity)
  if (o.device) q = q.where('device_id', '=', o.device)
  return q
    .orderBy((eb) =>
      eb
        .case()
        .when('severity', '=', 'critical')
        .then(0)
        .when('severity', '=', 'warning')
        .then(1)
        .else(2)
        .end(),
    )
    .orderBy('raised_hlc', 'desc')
    .limit(o.limit)
    .execute()
}

/** An operator error the CLI reports without a stack: unknown alert, already resolved. */
export class AlertCommandError extends OperatorError {}

/**
 * Publishes an `alert.acknowledged` event (an operator action is an event, so it replays too).
 * It continues the alert's correlation and is caused by the event that raised it.
 */
export async function acknowledgeAlert(
  rt: Runtime,
  clock: HybridLogicalClock,
  alertId: string,
  by: string,
  note?: string,
): Promise<{ eventId: string; seq: number; alert: Alert }> {
  const alert = await rt.db
    .selectFrom('alerts')
    .selectAll()
    .where('alert_id', '=', alertId)
    .executeTakeFirst()
  if (alert === undefined)
    throw new AlertCommandError(`'alert' must be an existing alert id, got '${alertId}'`)
  if (alert.state !== 'open') {
    throw new AlertCommandError(
      `alert '${alertId}' is ${alert.state}; only an open alert can be acknowledged`,
    )
  }
  const publisher = createPublisher(rt.js, { clock })
  const { event, seq } = await publisher.publish({
    type: 'alert.acknowledged',
    deviceId: alert.device_id,
    data: { alertId, by, ...(note !== undefined ? { note } : {}) },
    causedBy: {
      eventId: alert.raised_event_id,
      correlationId: alert.correlation_id,
      hlc: alert.raised_hlc,
    },
  })
  return { eventId: event.eventId, seq, alert }
}

/** One line per alert for the terminal. */
export function formatAlert(a: Alert): string {
  const when = a.raised_at.toISOString().replace('T', ' ').slice(0, 19)
  const ack = a.acknowledged_by ? ` ack by ${a.acknowledged_by}` : ''
  const times = a.occurrences > 1 ? ` x${a.occurrences}` : ''
  return `${a.alert_id}  ${a.severity.padEnd(8)} ${a.state.padEnd(12)} ${a.device_id}  ${a.rule_id}  ${when}  ${a.message}${times}${ack}`
}
