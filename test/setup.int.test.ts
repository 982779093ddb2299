import { DiscardPolicy, RetentionPolicy, StorageType } from '@nats-io/jetstream'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { freshDatabase, startNatsServer, type NatsServer } from './harness/test-servers.ts'
import { natsAdmin, runCli, testEnv } from './fixtures.ts'

describe('fleetstream setup', () => {
  let nats: NatsServer
  let env: Record<string, string>
  beforeAll(async () => {
    nats = await startNatsServer()
    env = testEnv(nats.url, await freshDatabase())
  })
  afterAll(async () => nats.cleanup())

  it('creates streams, consumer and schema, and a second run is a no-op', async () => {
    const first = await runCli(['setup'], env)
    expect(first.output).toContain('stream FLEET_EVENTS: created')
    expect(first.output).toContain('stream FLEET_DLQ: created')
    expect(first.output).toContain('stream FLEET_NOTIFICATIONS: created')
    for (const c of ['sensor-status', 'readings', 'alerts'])
      expect(first.output).toContain(`consumer ${c}: created`)
    expect(first.output).toContain(
      'schema: applied 2026-11-23-01-readings, 2026-11-23-02-status-rollups-alerts',
    )
    expect(first.code).toBe(0)

    const { nc, jsm } = await natsAdmin(nats.url)
    const before = await jsm.streams.info('FLEET_EVENTS')
    const second = await runCli(['setup', '--json'], env)
    expect(second.code).toBe(0)
    expect(JSON.parse(second.output)).toEqual({
      migrations: [],
      streams: {
        FLEET_EVENTS: 'unchanged',
        FLEET_DLQ: 'unchanged',
        FLEET_NOTIFICATIONS: 'unchanged',
      },
      consumers: { 'sensor-status': 'exists', readings: 'exists', alerts: 'exists' },
    })
    const after = await jsm.streams.info('FLEET_EVENTS')
    expect(after.config).toEqual(before.config)
    expect(after.created).toEqual(before.created)
    // What the stream promises: append-only, deduplicated, bounded messages.
    expect(after.config).toMatchObject({
      subjects: ['fleet.events.>'],
      storage: StorageType.File,
      retention: RetentionPolicy.Limits,
      discard: DiscardPolicy.New,
      deny_delete: true,
      deny_purge: true,
      max_msg_size: 16 * 1024,
      duplicate_window: 120_000_000_000,
      max_age: 0,
    })
    await expect(jsm.streams.purge('FLEET_EVENTS')).rejects.toThrow(/purge/i)
    await nc.close()
  })
})

describe('fleetstream setup against a conflicting stream', () => {
  let nats: NatsServer
  beforeAll(async () => {
    nats = await startNatsServer()
  })
  afterAll(async () => nats.cleanup())

  it('fails with every difference listed and changes nothing', async () => {
    const { nc, jsm } = await natsAdmin(nats.url)
    await jsm.streams.add({
      name: 'FLEET_EVENTS',
      subjects: ['fleet.events.>'],
      max_msg_size: 1024,
      storage: StorageType.Memory,
    })
    const before = await jsm.streams.info('FLEET_EVENTS')

    const r = await runCli(['setup'], testEnv(nats.url, await freshDatabase()))
    // A configuration error: exit 2, each setting named with the variable that sets it.
    expect(r.code, r.output).toBe(2)
    expect(r.output).toContain(
      'stream FLEET_EVENTS exists with a conflicting configuration (left unchanged)',
    )
    expect(r.output).toContain('storage is "memory", fleetstream expects "file"')
    expect(r.output).toContain(
      'max_msg_size is 1024 bytes, fleetstream expects 16384 bytes (FLEET_MAX_MSG_BYTES=16384)',
    )
    expect(r.output).toContain('deny_delete is false, fleetstream expects true')

    expect((await jsm.streams.info('FLEET_EVENTS')).config).toEqual(before.config)
    await nc.close()
  })
})

describe('fleetstream setup with a setting changed since the streams were made', () => {
  let nats: NatsServer
  beforeAll(async () => {
    nats = await startNatsServer()
  })
  afterAll(async () => nats.cleanup())

  it('names the variable and the value in days, not nanoseconds, and exits 2', async () => {
    const env = testEnv(nats.url, await freshDatabase())
    expect((await runCli(['setup'], env)).code).toBe(0)

    const r = await runCli(['setup'], { ...env, DLQ_MAX_AGE_DAYS: '7' })
    expect(r.code, r.output).toBe(2)
    expect(r.output).toContain('stream FLEET_DLQ exists with a conflicting configuration')
    expect(r.output).toContain(
      'max_age is 30 days, fleetstream expects 7 days (DLQ_MAX_AGE_DAYS=7)',
    )
    expect(r.output).not.toMatch(/\d{13,}/)
  })
})

describe('fleetstream setup on a FLEET_DLQ of an earlier version', () => {
  let nats: NatsServer
  beforeAll(async () => {
    nats = await startNatsServer()
  })
  afterAll(async () => nats.cleanup())

  it('widens its duplicate window to a day in place, so a re-park hours later stores nothing', async () => {
    const env = testEnv(nats.url, await freshDatabase())
    expect((await runCli(['setup'], env)).code).toBe(0)
    const { nc, jsm } = await natsAdmin(nats.url)
    const js = jsm.jetstream()
    const created = await jsm.streams.info('FLEET_DLQ')
    expect(created.config.duplicate_window).toBe(24 * 3600 * 1e9)
    // As earlier versions created it: a two-minute window, one entry in it.
    await jsm.streams.update('FLEET_DLQ', { ...created.config, duplicate_window: 120e9 })
    await js.publish('fleet.dlq.readings', 'x', { msgID: 'readings:e-1' })

    const r = await runCli(['setup', '--json'], env)
    expect(r.code).toBe(0)
    expect(JSON.parse(r.output)).toMatchObject({ streams: { FLEET_DLQ: 'updated' } })
    const after = await jsm.streams.info('FLEET_DLQ')
    expect(after.config).toEqual({ ...created.config, duplicate_window: 24 * 3600 * 1e9 })
    expect(after.created).toEqual(created.created)
    expect(after.state.messages).toBe(1)
    expect((await js.publish('fleet.dlq.readings', 'x', { msgID: 'readings:e-1' })).duplicate).toBe(
      true,
    )
    await nc.close()
  })
})

describe('fleetstream configuration', () => {
  it('refuses bad configuration with every problem listed at once (exit 2)', async () => {
    const r = await runCli(['setup'], {
      NATS_URL: 'http://localhost:4222',
      PROCESSOR_BATCH_SIZE: 'lots',
      HLC_MAX_OFFSET_MS: '-5',
    })
    expect(r.code).toBe(2)
    expect(r.output).toContain("'NATS_URL' must match")
    expect(r.output).toContain("got 'http://localhost:4222'")
    expect(r.output).toContain("'PROCESSOR_BATCH_SIZE' must be a number, got 'lots'")
    expect(r.output).toContain("'HLC_MAX_OFFSET_MS' must be at least 0, got -5")
  })
})
