/** `fleetstream setup`: the schema, the streams and the consumers, idempotent. */
import { Command } from 'commander'
import { SET_UP_WAITS, setUpWithin } from '../../app/bounded-setup.ts'
import { ensureMqttMessagesStream, MQTT_MESSAGES_STREAM } from '../../infra/streams.ts'
import { oneShot } from '../command-process.ts'
import { JSON_HELP } from '../json-output.ts'
import { timeoutOption } from '../options.ts'

export function setupCommand(): Command {
  return new Command('setup')
    .description(
      'create the database schema, the FLEET_EVENTS, FLEET_DLQ and FLEET_NOTIFICATIONS streams and the consumers (idempotent)',
    )
    .option('--json', JSON_HELP.document('the report'))
    .addOption(timeoutOption(SET_UP_WAITS))
    .action(async (opts: { json?: boolean; timeout: number }) => {
      await oneShot('fleetstream-setup', { ...opts, createDatabase: true }, async (rt, signal) => {
        const report = await setUpWithin(rt, opts.timeout, signal)
        const mqtt = await ensureMqttMessagesStream(rt.nc, rt.config.streams)
        if (opts.json) console.log(JSON.stringify(report))
        else {
          console.log(
            `schema: ${report.migrations.length ? `applied ${report.migrations.join(', ')}` : 'up to date'}`,
          )
          for (const [name, r] of Object.entries(report.streams))
            console.log(`stream ${name}: ${r}`)
          if (mqtt !== 'unreachable') console.log(`stream ${MQTT_MESSAGES_STREAM}: ${mqtt}`)
          for (const [name, r] of Object.entries(report.consumers))
            console.log(`consumer ${name}: ${r}`)
        }
      })
    })
}
