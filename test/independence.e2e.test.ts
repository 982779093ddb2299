import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Runtime } from '../app/runtime.ts'
import { PublishPipeline } from '../infra/publisher.ts'
import type { NatsServer } from './harness/test-servers.ts'
import {
  cliSystem,
  readingDraft,
  spawnCli,
  testPublisher,
  waitFor,
  type CliProcess,
} from './fixtures.ts'

describe('processors as independent processes', () => {
  let nats: NatsServer
  let rt: Runtime
  let env: Record<string, string>
  const procs: CliProcess[] = []
  beforeAll(async () => {
    ;({ nats, env, rt } = await cliSystem())
  })
  afterAll(async () => {
    for (const p of procs) p.child.kill('SIGKILL')
    await rt.close()
    await nats.cleanup()
  })

  const count = async (sql: string) => Number((await rt.pool.query<{ n: string }>(sql)).rows[0]!.n)
  const applied = async () => ({
    readings: await count('select count(*) as n from readings'),
    sensors: await count('select count(*) as n from sensor_status'),
    alertSensors: await count('select count(*) as n from alert_sensors'),
  })

  it('each runs on its own, and one that is stuck blocks none of the others', async () => {
    for (const name of ['sensor-status', 'readings', 'alerts']) {
      procs.push(spawnCli(['run', name, '--no-clock'], env))
    }
    const publisher = testPublisher(rt)
    const publish = async (from: number, n: number) => {
      const pipe = new PublishPipeline(256)
      for (let i = from; i < from + n; i++)
        await pipe.submit(() => publisher.publish(readingDraft(`ind-${i}`, i)))
      await pipe.drain()
    }
    await publish(0, 200)
    await waitFor('all three processes to apply the first 200 events', async () => {
      const a = await applied()
      return a.readings === 200 && a.sensors === 200 && a.alertSensors === 200
    })

    // An operator's transaction holds the alerts processor's tables: it cannot commit.
    const blocker = new pg.Client(rt.config.databaseUrl)
    await blocker.connect()
    await blocker.query('begin')
    await blocker.query('lock table alert_sensors, alerts in access exclusive mode')
    await publish(200, 300)
    await waitFor('sensor-status and readings to go on without alerts', async () => {
      const r = await rt.pool.query<{ n: string }>('select count(*) as n from readings')
      const s = await rt.pool.query<{ n: string }>('select count(*) as n from sensor_status')
      return Number(r.rows[0]!.n) === 500 && Number(s.rows[0]!.n) === 500
    })
    const lagging = await rt.jsm.consumers.info(rt.config.streams.events, 'alerts')
    expect(lagging.num_pending + lagging.num_ack_pending).toBeGreaterThan(0)

    await blocker.query('rollback')
    await blocker.end()
    await waitFor(
      'the alerts processor to catch up once released',
      async () => (await applied()).alertSensors === 500,
      60_000,
      () => procs.map((p) => p.output()).join('\n'),
    )
    expect(await applied()).toEqual({ readings: 500, sensors: 500, alertSensors: 500 })
    for (const p of procs) p.child.kill('SIGTERM')
    expect(await Promise.all(procs.map((p) => p.exited))).toEqual([0, 0, 0])
  })
})
