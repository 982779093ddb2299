/**
 * The alerts processor's spec: what it reads, handles and writes.
 */
import type { Config } from '../infra/config.ts'
import { alertsBulkLoad } from '../projections/alerts-bulk-load.ts'
import { alertsProjection } from '../projections/alerts.ts'
import type { AlertRules } from '../projections/alert-rules.ts'
import { anyEvents } from '../projections/projection.ts'
import { runOutboxRelay } from './outbox-relay.ts'
import type { ProcessorSpec } from './runner/types.ts'

/**
 * alerts
 * - reads:   FLEET_EVENTS, durable consumer `alerts`, filter `fleet.events.>`
 * - handles: readings and heartbeats (thresholds, battery), the sensor life cycle and clock ticks
 *            (silence), alert.acknowledged (operator actions)
 * - writes:  alerts, alert_conditions, alert_sensors (+ _timeline), alert_inputs, alert_horizons,
 *            alert_tips, notification_outbox, projection_clocks
 * - sends:   notification_outbox -> FLEET_NOTIFICATIONS (fleet.notifications.alerts.<severity>.<deviceId>.<id>)
 */
export function alertsProcessor(config: Config, rules: AlertRules): ProcessorSpec {
  const opts = { rules, defaultTimeoutSeconds: config.sensorInactivityTimeoutSeconds }
  const projection = anyEvents(alertsProjection(opts))
  return {
    name: 'alerts',
    reads: 'all',
    projection,
    bulkLoad: () => alertsBulkLoad(projection, opts),
    companion: runOutboxRelay,
  }
}
