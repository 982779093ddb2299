import { sql } from 'kysely'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Runtime } from '../app/runtime.ts'
import { findDivergence, MarkDigest, sweepMarks } from '../processors/progress/stream-marks.ts'
import { eventsFilter } from '../schemas/subjects.ts'
import { freshDatabase, startNatsServer, type NatsServer } from './harness/test-servers.ts'
import { readingDraft, testConfig, testPublisher, testRuntime } from './fixtures.ts'

/** The checks of processors/progress/stream-marks.ts against a real stream and real marks in Postgres. */
describe('stream marks against a stream', () => {
  let nats: NatsServer
  let rt: Runtime
  /** What each stored message digests to, by sequence. */
  const digests = new Map<number, string>()

  beforeAll(async () => {
    nats = await startNatsServer()
    rt = await testRuntime(testConfig(nats.url, await freshDatabase()))
    const publisher = testPublisher(rt)
    for (let i = 1; i <= 6; i++) await publisher.publish(readingDraft(`sensor-${i}`, i))
    for (let seq = 1; seq <= 6; seq++) {
      const m = (await rt.jsm.streams.getMessage(rt.config.streams.events, { seq }))!
      const d = new MarkDigest()
      d.add(m.subject, m.data)
      digests.set(seq, d.digest())
    }
  })
  afterAll(async () => {
    await rt.close()
    await nats.cleanup()
  })

  /** The mark of a 'readings' commit over (from, last], `ageS` seconds old; `wrongAt` is recorded wrong. */
  async function mark(from: number, last: number, ageS: number, wrongAt?: number) {
    const d = new MarkDigest()
    for (let seq = from + 1; seq <= last; seq++) {
      const m = (await rt.jsm.streams.getMessage(rt.config.streams.events, { seq }))!
      // The message a processor read at `wrongAt` was another one than the stream holds now.
      d.add(m.subject, seq === wrongAt ? new TextEncoder().encode('another event') : m.data)
    }
    await rt.db
      .insertInto('processor_stream_marks')
      .values({
        processor: 'readings',
        from_seq: from,
        last_seq: last,
        messages: last - from,
        digest: d.digest(),
        last_digest: last === wrongAt ? 'not-what-is-there' : digests.get(last)!,
        committed_at: sql<Date>`now() - make_interval(secs => ${ageS})`,
      })
      .execute()
  }

  /** Marks of 'readings' for (0,2], (2,4], (4,6], aged `ageS` seconds; `wrongAt` is recorded wrong. */
  async function marks(ageS: number, wrongAt?: number) {
    await rt.db.deleteFrom('processor_stream_marks').execute()
    await mark(0, 2, ageS, wrongAt)
    await mark(2, 4, ageS, wrongAt)
    await mark(4, 6, ageS, wrongAt)
  }

  const find = () =>
    findDivergence(rt.db, rt.jsm, rt.config.streams.events, 'readings', eventsFilter('reading'), {
      afterSeq: 0,
    })
  const sweep = () => sweepMarks(rt.db, rt.jsm, rt.config.streams.events, 'readings', 0)

  it('agree with the stream they were taken from', async () => {
    await marks(30)
    expect(await find()).toBeUndefined()
    expect(await sweep()).toEqual({ sweptTo: 6 })
  })

  it('find a message that differs inside a commit, though its last one agrees', async () => {
    await marks(30, 3)
    const found = await find()
    expect(found?.mark).toMatchObject({ fromSeq: 2, lastSeq: 4 })
    expect(await sweep()).toEqual({ sweptTo: 6 }) // the sweep looks at last messages only
  })

  it('sweep a commit once it is old enough, and stop at the first whose last message differs', async () => {
    await marks(30, 4)
    expect(await sweep()).toEqual({ sweptTo: 2, disagreesAt: 4 })
    expect((await find())?.mark).toMatchObject({ fromSeq: 2, lastSeq: 4 })
    await marks(5, 4) // younger than the sweep's delay: not yet
    expect(await sweep()).toEqual({ sweptTo: 0 })
  })

  it("at a session start, compare the last seconds of commits before it, not the session's own", async () => {
    await rt.db.deleteFrom('processor_stream_marks').execute()
    await mark(0, 2, 60, 1) // wrong, but a minute older than the newest commit before the session
    await mark(2, 4, 30, 3) // the newest before a session that started at 4
    await mark(4, 6, 0, 5) // that session's own commit, made while the comparison runs
    const atStart = (sessionStart: number) =>
      findDivergence(rt.db, rt.jsm, rt.config.streams.events, 'readings', eventsFilter('reading'), {
        sessionStart,
      })
    expect((await atStart(4))?.mark).toMatchObject({ fromSeq: 2, lastSeq: 4 })
    // A session that started at 6 committed nothing yet: only (4,6] is in its last ten seconds.
    expect((await atStart(6))?.mark).toMatchObject({ fromSeq: 4, lastSeq: 6 })
    // Nothing before a session that starts at 0.
    expect(await atStart(0)).toBeUndefined()
  })

  it('find a commit whose range the stream no longer reaches', async () => {
    await marks(30)
    await rt.db
      .updateTable('processor_stream_marks')
      .set({ last_seq: 9 })
      .where('last_seq', '=', 6)
      .execute()
    const found = await find()
    expect(found?.mark).toMatchObject({ fromSeq: 4, lastSeq: 9 })
    expect(found?.found).toMatch(/the stream ends there/)
  })
})
