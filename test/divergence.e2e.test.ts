import { cp, rm } from 'node:fs/promises'
import { join } from 'node:path'
import pg from 'pg'
import { describe, expect, it } from 'vitest'
import { PROCESSOR_NAMES } from '../processors/processor-registry.ts'
import type { FleetEvent } from '../schemas/events.ts'
import { freshDatabase, startNatsServer } from './harness/test-servers.ts'
import {
  allCaughtUp,
  readingDraft,
  spawnCli,
  testConfig,
  testEnv,
  testPublisher,
  testRuntime,
  waitFor,
  type CliProcess,
} from './fixtures.ts'

/**
 * nats-server 2.9 can lose the tail of a stream in a failover: a new stream leader lacks the last
 * messages the old one handed out, and new events take their sequences. Shown here on one server
 * by putting back an older copy of its store: the sequences the processors have applied (and
 * checkpointed past) then hold other events.
 */
describe('a stream that lost its tail under the processors', () => {
  it.each([
    // whichever it sees first: the stream shorter than delivered, the reconnect, a new session
    ['running through it', true, '[^"]+'],
    ['down during it', false, 'session start'],
  ])(
    'is noticed by processors %s, and the events now at those sequences are applied',
    async (_, runningThrough, why) => {
      const nats = await startNatsServer()
      const dbUrl = await freshDatabase()
      const env = testEnv(nats.url, dbUrl, { LOG_LEVEL: 'info', PROCESSOR_BATCH_LINGER_MS: '1' })
      const rt = await testRuntime(testConfig(nats.url, dbUrl))
      const client = new pg.Client(dbUrl)
      await client.connect()
      const runs: CliProcess[] = []
      try {
        const readings = async () =>
          (await client.query<{ event_id: string }>('select event_id from readings')).rows
            .map((r) => r.event_id)
            .sort()
        const publisher = testPublisher(rt)
        const stamp = (prefix: string, i: number) =>
          publisher.stamp({ ...readingDraft(`sensor-${i}`, i), eventId: `${prefix}-${i}` })
        const publishAll = async (events: FleetEvent[]) => {
          for (const e of events) await publisher.publishEvent(e)
        }
        const kept = [1, 2, 3, 4, 5].map((i) => stamp('kept', i))
        const lost = [1, 2, 3, 4, 5].map((i) => stamp('lost', i))
        await publishAll(kept)
        // The store as the failover will leave it: only what was there up to this point.
        const store = join(nats.dir, 'js')
        const older = join(nats.dir, 'js-older')
        await nats.stop()
        await cp(store, older, { recursive: true })
        await nats.restart()

        // A backlog, so that the processors take it in one batch.
        await publishAll(lost)
        runs.push(spawnCli(['run', '--no-clock'], env))
        await waitFor('all ten readings applied', async () => (await readings()).length === 10)
        await allCaughtUp(rt, PROCESSOR_NAMES)
        if (!runningThrough) {
          runs[0]!.child.kill('SIGTERM')
          expect(await runs[0]!.exited).toBe(0)
        }

        // The failover: the server comes back without the last five events...
        await nats.kill('SIGKILL')
        await rm(store, { recursive: true, force: true })
        await cp(older, store, { recursive: true })
        await nats.restart()
        // ...and other events take their sequences, between the same first and last event
        // (re-sent by their device), so a check of a batch's ends alone would pass.
        const after = [2, 3, 4].map((i) => stamp('after', i))
        await waitFor('NATS to take events again', async () => {
          try {
            await publishAll([lost[0]!, ...after, lost[4]!])
            return true
          } catch {
            return false
          }
        })
        const { state } = await rt.jsm.streams.info(rt.config.streams.events)
        expect(state.last_seq).toBe(10) // the sequences the lost events had
        if (!runningThrough) runs.push(spawnCli(['run', '--no-clock'], env))

        const output = () => runs.map((r) => r.output()).join('\n')
        // Each processor sees the new events as a user would: readings rows, and both sensor
        // tables' last-seen event (the newest event of each sensor).
        const lastSeen = async (table: string) =>
          (
            await client.query<{ id: string }>(
              `select last_seen_event_id as id from ${table} order by device_id`,
            )
          ).rows.map((r) => r.id)
        const applied = async () => ({
          readings: (await readings()).filter((id) => id.startsWith('after-')),
          sensor_status: await lastSeen('sensor_status'),
          alert_sensors: await lastSeen('alert_sensors'),
        })
        const newest = ['lost-1', 'after-2', 'after-3', 'after-4', 'lost-5']
        await waitFor(
          'the events now at the lost sequences to be applied by every processor',
          async () =>
            JSON.stringify(await applied()) ===
            JSON.stringify({
              readings: ['after-2', 'after-3', 'after-4'],
              sensor_status: newest,
              alert_sensors: newest,
            }),
          60_000,
          async () => `${JSON.stringify(await applied())}\n${output().slice(-3000)}`,
        )
        // What was applied stays applied (a read model does not forget); nothing is doubled.
        expect(await readings()).toEqual([...kept, ...lost, ...after].map((e) => e.eventId).sort())
        await allCaughtUp(rt, PROCESSOR_NAMES)
        const checkpoints = await client.query<{ processor: string; last_seq: number }>(
          'select processor, last_seq::int from processor_checkpoints order by processor',
        )
        expect(checkpoints.rows).toEqual(
          [...PROCESSOR_NAMES].sort().map((processor) => ({ processor, last_seq: 10 })),
        )
        // Every processor said what it did and why.
        for (const name of PROCESSOR_NAMES) {
          expect(output()).toMatch(
            new RegExp(
              `"processor":"${name}".*"why":"${why}".*"rewoundTo":\\d+,"msg":"the stream no longer holds what was applied`,
            ),
          )
        }
      } finally {
        for (const r of runs) r.child.kill('SIGKILL')
        await client.end()
        await rt.close()
        await nats.cleanup()
      }
    },
    180_000,
  )
})
