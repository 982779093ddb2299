/**
 * `fleetstream simulate`: a simulated fleet publishing into the stream, and the fleet options it
 * shares with `start`.
 */
import { Command, Option } from 'commander'
import { clockFor } from '../../app/clocks.ts'
import type { Runtime } from '../../app/runtime.ts'
import { isPermissionViolation, isTransient } from '../../infra/failures.ts'
import { createPublisher } from '../../infra/publisher.ts'
import { errorSummary, withBackoff } from '../../infra/retry.ts'
import { ensureStreams } from '../../infra/streams.ts'
import { simulateFleet, type SimulationOptions } from '../../simulator/fleet.ts'
import { oneShot } from '../command-process.ts'
import { JSON_HELP } from '../json-output.ts'
import {
  nonNegative,
  nonNegativeInteger,
  positive,
  positiveInteger,
  ratio,
  timeoutOption,
} from '../options.ts'
import { fmt } from '../progress.ts'

export interface SimulateFlags {
  devices: number
  rate: number
  duration: number
  duplicates: number
  seed?: number
  outageShare: number
  outageAt: number
  outageFor: number
  reconnectJitter: number
}

/** The fleet options `simulate` and `start` share; only what --duration means differs. */
export function withSimulationOptions(
  cmd: Command,
  duration: { help: string; default: number },
): Command {
  return cmd
    .addOption(
      new Option('--devices <n>', 'simulated sensors').argParser(positiveInteger).default(100),
    )
    .addOption(
      new Option('--rate <events/s>', 'events per second across the fleet')
        .argParser(positive)
        .default(200),
    )
    .addOption(
      new Option('--duration <seconds>', duration.help)
        .argParser(nonNegative)
        .default(duration.default),
    )
    .addOption(
      new Option('--duplicates <ratio>', 'share of publishes that re-send an earlier event (0..1)')
        .argParser(ratio)
        .default(0.05),
    )
    .addOption(
      new Option('--seed <n>', 'seed for a repeatable fleet').argParser(nonNegativeInteger),
    )
    .addOption(
      new Option('--outage-share <ratio>', 'share of devices that lose the network at once (0..1)')
        .argParser(ratio)
        .default(0),
    )
    .addOption(
      new Option('--outage-at <seconds>', 'when the outage starts')
        .argParser(nonNegative)
        .default(5),
    )
    .addOption(
      new Option('--outage-for <seconds>', 'how long it lasts').argParser(nonNegative).default(10),
    )
    .addOption(
      new Option(
        '--reconnect-jitter <seconds>',
        'each device reconnects after a random delay up to this',
      )
        .argParser(nonNegative)
        .default(5),
    )
}

/** The simulator's options from the command's flags. */
export function simulation(opts: SimulateFlags): SimulationOptions {
  return {
    devices: opts.devices,
    rate: opts.rate,
    durationSeconds: opts.duration,
    duplicateRatio: opts.duplicates,
    ...(opts.seed !== undefined ? { seed: opts.seed } : {}),
    ...(opts.outageShare > 0
      ? {
          outage: {
            share: opts.outageShare,
            atSeconds: opts.outageAt,
            forSeconds: opts.outageFor,
            reconnectJitterSeconds: opts.reconnectJitter,
          },
        }
      : {}),
  }
}

/** The streams of setUp only, waited for the same way (the simulator has no database). */
async function setUpStreams(rt: Runtime, signal: AbortSignal): Promise<void> {
  await withBackoff(rt.log, 'set up streams', {
    isPermanent: (err) => !isTransient(err),
  }).execute(() => ensureStreams(rt.jsm, rt.config.streams), signal)
}

export function simulateCommand(): Command {
  return withSimulationOptions(
    new Command('simulate').description(
      'publish a simulated fleet: registrations, then readings and heartbeats at a rate, with re-sent duplicates',
    ),
    { help: 'seconds to run; 0 runs until Ctrl-C', default: 10 },
  )
    .option('--json', JSON_HELP.document('the summary'))
    .addOption(timeoutOption('NATS'))
    .action(async (opts: SimulateFlags & { json?: boolean; timeout: number }) => {
      await oneShot('fleetstream-simulate', { ...opts, postgres: false }, async (rt, signal) => {
        // The streams only: the simulator publishes, it has no use for the database. The gateway
        // role may not touch the JetStream API at all: it never sets up (asking would only be
        // refused, and the refusal logged as a NATS connection error on every start).
        const mayNotSetUp = rt.config.natsAuth?.user === 'gateway'
        await (mayNotSetUp ? Promise.resolve() : setUpStreams(rt, signal)).catch((err: unknown) => {
          // Devices publish; they do not set up (README.md, "NATS roles").
          if (!isPermissionViolation(err)) throw err
          rt.log.info(
            { err: errorSummary(err) },
            'this NATS user may not set up streams (the device role): publishing into the streams fleetstream setup created',
          )
        })
        const publisher = createPublisher(rt.js, { clock: clockFor(rt.config, 'sim') })
        const stats = await simulateFleet(publisher, simulation(opts), signal)
        if (opts.json) console.log(JSON.stringify(stats))
        else {
          const rate = Math.round(
            (stats.sent + stats.resent) / Math.max(stats.elapsedMs / 1000, 0.001),
          )
          console.log(
            `sent ${fmt(stats.sent)} events and ${fmt(stats.resent)} re-sends in ${(stats.elapsedMs / 1000).toFixed(1)} s ` +
              `(${fmt(rate)}/s); the stream stored ${fmt(stats.stored)} and reported ${fmt(stats.duplicateAcks)} duplicates` +
              (stats.reconnected > 0
                ? `; ${fmt(stats.reconnected)} devices reconnected within ${stats.reconnectSeconds.toFixed(1)} s and replayed ${fmt(stats.buffered)} buffered events`
                : ''),
          )
        }
      })
    })
}
