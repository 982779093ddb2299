import { OperatorError } from '../infra/errors.ts'
import type { Alert } from '../projections/tables.ts'
import { createPublisher } from '../infra/publisher.ts'
import type { HybridLogicalClock } from '../schemas/hlc.ts'
import type { Runtime } from '../app/runtime.ts'

export interface ListOptions {
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
