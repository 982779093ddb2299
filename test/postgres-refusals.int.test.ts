import { sql } from 'kysely'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import type { Runtime } from '../app/runtime.ts'
import { eventHeaders, PublishPipeline, type Publisher } from '../infra/publisher.ts'
import { startProcessor } from '../processors/runner/runner.ts'
import { type RunningProcessor } from '../processors/runner/types.ts'
import { decodeEvent } from '../schemas/decode.ts'
import type { FleetEvent } from '../schemas/events.ts'
import { eventSubject, Headers } from '../schemas/subjects.ts'
import { freshDatabase, startNatsServer, type NatsServer } from './harness/test-servers.ts'
import {
  allCaughtUp,
  readingDraft,
  testConfig,
  testPublisher,
  testRuntime,
  waitFor,
} from './fixtures.ts'

/**
 * "A value the schema accepts must be a value Postgres stores" (issue 12, item 2), tried against
 * real Postgres: what the schema refuses, Postgres refuses (or stores altered); what it accepts at
 * its edges, Postgres stores; and an event Postgres still refuses is that event's fault, parked
 * once, while the processor goes on.
 */
describe('values Postgres refuses', () => {
  let nats: NatsServer
  let rt: Runtime
  let publisher: Publisher
  let processors: RunningProcessor[] = []
  beforeEach(async () => {
    nats = await startNatsServer()
    rt = await testRuntime(
      testConfig(nats.url, await freshDatabase(), { PROCESSOR_BATCH_SIZE: '256' }),
    )
    publisher = testPublisher(rt)
  })
  afterEach(async () => {
    await Promise.all(processors.map((p) => p.stop()))
    processors = []
    await rt.close()
    await nats.cleanup()
  })

  /** Publishes an event as it is, bypassing the publisher's own validation (a hostile device). */
  const publishRaw = async (event: FleetEvent & Record<string, unknown>) => {
    const pa = await rt.js.publish(
      eventSubject(event.deviceId, event.type),
      JSON.stringify(event),
      {
        msgID: event.eventId,
        headers: eventHeaders(event),
      },
    )
    return pa.seq
  }

  /** How many DLQ entries each original event id has (counted, not collected into a set). */
  const dlqEntries = async () => {
    const last = (await rt.jsm.streams.info(rt.config.streams.dlq)).state.last_seq
    const entries: { id: string; reason: string; detail: string; processor: string }[] = []
    for (let seq = 1; seq <= last; seq++) {
      const m = await rt.jsm.streams.getMessage(rt.config.streams.dlq, { seq }).catch(() => null)
      if (!m) continue
      entries.push({
        id: m.header.get(Headers.DlqKey),
        reason: m.header.get(Headers.DlqReason),
        detail: m.header.get(Headers.DlqDetail),
        processor: m.header.get(Headers.DlqProcessor),
      })
    }
    const perId = new Map<string, number>()
    for (const e of entries) perId.set(e.id, (perId.get(e.id) ?? 0) + 1)
    return { entries, perId }
  }

  it('what the schema refuses, Postgres refuses or alters; the edges it accepts, Postgres stores', async () => {
    /** What Postgres says to a value cast as the projections cast it: the value back, or its SQLSTATE. */
    const pgSays = async (value: unknown, type: string): Promise<unknown> => {
      try {
        const r = await sql<{
          v: unknown
        }>`select (${[value]}::${sql.raw(type)}[])[1] as v`.execute(rt.db)
        return r.rows[0]?.v
      } catch (err) {
        return (err as { code?: string }).code
      }
    }
    const base = publisher.stamp({
      type: 'status.changed',
      deviceId: 'edge-1',
      data: { status: 'maintenance', reason: 'x' },
    })
    const decodes = (patch: Record<string, unknown>) => {
      const event = { ...base, ...patch }
      return decodeEvent({
        subject: eventSubject('edge-1', 'status.changed'),
        data: new TextEncoder().encode(JSON.stringify(event)),
      }).ok
    }

    const refused: [string, unknown, string, Record<string, unknown>][] = [
      [
        'U+0000 in text',
        'a\u0000b',
        'text',
        { data: { status: 'maintenance', reason: 'a\u0000b' } },
      ],
      [
        'U+0000 in jsonb',
        JSON.stringify({ a: 'a\u0000b' }),
        'jsonb',
        { data: { status: 'maintenance', reason: 'a\u0000b' } },
      ],
      [
        'a lone surrogate in jsonb',
        JSON.stringify({ a: 'a\ud800b' }),
        'jsonb',
        { data: { status: 'maintenance', reason: 'a\ud800b' } },
      ],
      [
        'year 0000',
        '0000-06-01T00:00:00.000Z',
        'timestamptz',
        { occurredAt: '0000-06-01T00:00:00.000Z' },
      ],
      ['0000-02-29', '0000-02-29T00:00:00Z', 'timestamptz', { occurredAt: '0000-02-29T00:00:00Z' }],
      [
        'offset +16:00',
        '2026-01-01T00:00:00+16:00',
        'timestamptz',
        { occurredAt: '2026-01-01T00:00:00+16:00' },
      ],
      [
        'offset -23:59',
        '2026-01-01T00:00:00-23:59',
        'timestamptz',
        { occurredAt: '2026-01-01T00:00:00-23:59' },
      ],
    ]
    const said = await Promise.all(refused.map(([, v, type]) => pgSays(v, type)))
    expect(Object.fromEntries(refused.map(([what], i) => [what, said[i]]))).toEqual({
      'U+0000 in text': '22021',
      'U+0000 in jsonb': '22P05',
      'a lone surrogate in jsonb': '22P02',
      'year 0000': '22008',
      '0000-02-29': '22008',
      'offset +16:00': '22009',
      'offset -23:59': '22009',
    })
    for (const [what, , , patch] of refused) expect(decodes(patch), what).toBe(false)
    // A lone surrogate in text is not refused: the driver sends U+FFFD in its place.
    expect(await pgSays('a\ud800b', 'text')).toBe('a\ufffdb')
    expect(decodes({ data: { status: 'maintenance', reason: 'a\ud800b' } })).toBe(false)

    // The edges the schema accepts are stored as they are.
    const accepted: [unknown, string, unknown][] = [
      ['0001-01-01T00:00:00Z', 'timestamptz', new Date('0001-01-01T00:00:00Z')],
      ['0001-01-01T00:00:00+15:59', 'timestamptz', new Date('0001-01-01T00:00:00+15:59')],
      ['9999-12-31T23:59:59.999-15:59', 'timestamptz', new Date('9999-12-31T23:59:59.999-15:59')],
      ['ok 😀 \u0001\u007f\ufffe', 'text', 'ok 😀 \u0001\u007f\ufffe'],
      [1.7976931348623157e308, 'float8', 1.7976931348623157e308],
      [-1.7976931348623157e308, 'float8', -1.7976931348623157e308],
      [5e-324, 'float8', 5e-324],
      [7 * 24 * 3600, 'int4', 7 * 24 * 3600],
    ]
    for (const [v, type, back] of accepted) expect(await pgSays(v, type), String(v)).toEqual(back)
    for (const occurredAt of [
      '0001-01-01T00:00:00Z',
      '0001-01-01T00:00:00+15:59',
      '9999-12-31T23:59:59.999-15:59',
    ])
      expect(decodes({ occurredAt }), occurredAt).toBe(true)

    // ...and through the processors, into the read models.
    processors = [
      startProcessor(rt.processors.readings, rt),
      startProcessor(rt.processors['sensor-status'], rt),
    ]
    const edges = [
      {
        ...publisher.stamp(readingDraft('edge-1', 1.7976931348623157e308)),
        occurredAt: '0001-01-01T00:00:00Z',
      },
      {
        ...publisher.stamp(readingDraft('edge-1', 5e-324, 'tiny')),
        occurredAt: '9999-12-31T23:59:59.999-15:59',
      },
      publisher.stamp({
        type: 'sensor.registered',
        deviceId: 'edge-1',
        data: { site: 's', model: 'm', firmware: 'f', inactivityTimeoutSeconds: 7 * 24 * 3600 },
      }),
      publisher.stamp({
        type: 'status.changed',
        deviceId: 'edge-1',
        data: { status: 'maintenance', reason: `${'😀'.repeat(127)}\u0001` },
      }),
    ]
    for (const e of edges) await publishRaw(e)
    await allCaughtUp(rt, ['readings', 'sensor-status'])
    expect(processors.map((p) => p.stats.rejected)).toEqual([0, 0])
    expect(
      await rt.db
        .selectFrom('readings')
        .select(['value', 'occurred_at'])
        .orderBy('value')
        .execute(),
    ).toEqual([
      { value: 5e-324, occurred_at: new Date('9999-12-31T23:59:59.999-15:59') },
      { value: 1.7976931348623157e308, occurred_at: new Date('0001-01-01T00:00:00Z') },
    ])
    expect(
      await rt.db
        .selectFrom('sensor_status')
        .select(['status', 'inactivity_timeout_seconds'])
        .execute(),
    ).toEqual([{ status: 'maintenance', inactivity_timeout_seconds: 7 * 24 * 3600 }])
  })

  it('25 status.changed with U+0000 in reason, then valid events: parked at decode once each, the rest applied, checkpoint at the end', async () => {
    const status = startProcessor(rt.processors['sensor-status'], rt)
    processors = [status]
    const bad: string[] = []
    for (let i = 0; i < 25; i++) {
      const e = publisher.stamp({
        type: 'status.changed',
        deviceId: `nul-${i}`,
        data: { status: 'maintenance', reason: 'x' },
      })
      await publishRaw({ ...e, data: { status: 'maintenance', reason: `bad\u0000${i}` } })
      bad.push(e.eventId)
    }
    let last = 0
    for (let i = 0; i < 10; i++) {
      last = (
        await publisher.publish({
          type: 'status.changed',
          deviceId: `ok-${i}`,
          data: { status: 'maintenance', reason: 'calibration' },
        })
      ).seq
    }
    await waitFor(
      'the checkpoint to reach the last event',
      () => status.stats.checkpoint === last,
      30_000,
      () => JSON.stringify(status.stats),
    )
    const { entries, perId } = await dlqEntries()
    expect(bad.map((id) => perId.get(id) ?? 0)).toEqual(bad.map(() => 1))
    expect(entries).toHaveLength(25)
    expect(new Set(entries.map((e) => e.reason))).toEqual(new Set(['invalid-event']))
    expect(entries[0]?.detail).toBe(
      "'data.reason' must not contain U+0000 (Postgres text cannot hold it), got 'bad\\u00000'",
    )
    const rows = await rt.db.selectFrom('sensor_status').select('device_id').execute()
    expect(rows.map((r) => r.device_id).sort()).toEqual(
      Array.from({ length: 10 }, (_, i) => `ok-${i}`).sort(),
    )
    const cp = await rt.db
      .selectFrom('processor_checkpoints')
      .select('last_seq')
      .where('processor', '=', 'sensor-status')
      .executeTakeFirstOrThrow()
    expect(cp.last_seq).toBe(last)
  })

  it('a burst of 1,000 events that pass the schema but Postgres refuses (a CHECK constraint), then valid ones: each parked once, the valid applied', async () => {
    // A plausibility rule an operator put on the read model: nothing is colder than absolute zero.
    await sql`alter table readings add constraint readings_above_absolute_zero
                check (metric <> 'temperature' or value >= -273.15)`.execute(rt.db)
    const readings = startProcessor(rt.processors.readings, rt)
    processors = [readings]
    const pipe = new PublishPipeline(128)
    const bad: string[] = []
    let last = 0
    for (let i = 0; i < 1100; i++) {
      await pipe.submit(async () => {
        const r = await publisher.publish(readingDraft(`cold-${i % 20}`, i < 1000 ? -300 : 20 + i))
        if (i < 1000) bad.push(r.event.eventId)
        last = Math.max(last, r.seq)
        return r
      })
    }
    await pipe.drain()
    const started = performance.now()
    await waitFor(
      'the checkpoint to pass the burst and the valid events',
      () => readings.stats.checkpoint === last,
      90_000,
      () => JSON.stringify(readings.stats),
    )
    const seconds = (performance.now() - started) / 1000
    console.log(`1,000 refused by Postgres + 100 valid: ${seconds.toFixed(1)} s`, readings.stats)

    const { entries, perId } = await dlqEntries()
    expect(bad.map((id) => perId.get(id) ?? 0)).toEqual(bad.map(() => 1))
    expect(entries).toHaveLength(1000)
    expect(new Set(entries.map((e) => e.reason))).toEqual(new Set(['storage-refused']))
    expect(entries[0]?.detail).toContain('readings_above_absolute_zero')
    expect(entries[0]?.detail).toContain('23514')
    const count = await rt.db
      .selectFrom('readings')
      .select((eb) => eb.fn.countAll<string>().as('n'))
      .executeTakeFirstOrThrow()
    expect(Number(count.n)).toBe(100)
    expect(readings.stats).toMatchObject({ rejected: 1000, state: 'running' })
    const info = await rt.jsm.consumers.info(rt.config.streams.events, 'readings')
    expect({ ackPending: info.num_ack_pending, floor: info.ack_floor.stream_seq }).toEqual({
      ackPending: 0,
      floor: last,
    })
  }, 180_000)
})
