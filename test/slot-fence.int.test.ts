import { sql } from 'kysely'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Runtime } from '../app/runtime.ts'
import { advanceCheckpoint, readCheckpoint } from '../processors/progress/checkpoints.ts'
import { LEASE_TIMEOUT_MS, Lease } from '../processors/progress/locks.ts'
import { fencedDatabase, SlotLostError } from '../processors/progress/slot-fence.ts'
import { freshDatabase, startNatsServer, type NatsServer } from './harness/test-servers.ts'
import { testConfig, testRuntime, waitFor } from './fixtures.ts'

describe('a slot fenced by its lease', { timeout: 120_000 }, () => {
  let nats: NatsServer
  let rt: Runtime
  beforeAll(async () => {
    nats = await startNatsServer()
    rt = await testRuntime(testConfig(nats.url, await freshDatabase()))
    await rt.pool.query('create table fence_probe (id text primary key)')
  })
  afterAll(async () => {
    await rt.close()
    await nats.cleanup()
  })

  /** A lease that joined and holds `slot`, and what it reported lost. */
  async function holding(slot: string): Promise<{ lease: Lease; lost: Error[] }> {
    const lost: Error[] = []
    const lease = await Lease.open(rt.pool, 'readings', (err) => lost.push(err))
    expect(await lease.join()).toBe(true)
    expect(await lease.tryAcquire(slot)).toBe(true)
    return { lease, lost }
  }

  function advance(db: ReturnType<typeof fencedDatabase>, slot: string, from: number, to: number) {
    return db.transaction().execute(async (trx) => {
      await sql`insert into fence_probe (id) values (${`${slot}-${to}`})`.execute(trx)
      await advanceCheckpoint(
        trx,
        slot,
        'FLEET_EVENTS',
        { lastSeq: from, hlc: null },
        { lastSeq: to, hlc: null },
      )
    })
  }

  async function probes(slot: string): Promise<number> {
    const r = await rt.pool.query<{ n: number }>(
      'select count(*)::int as n from fence_probe where id like $1',
      [`${slot}-%`],
    )
    return r.rows[0]!.n
  }

  it('commits while its lease holds the slot; once the session is gone, a commit in flight rolls back with SlotLostError', async () => {
    const slot = 'readings-p0'
    const { lease, lost } = await holding(slot)
    try {
      const db = fencedDatabase(rt.pool, lease, slot)
      await advance(db, slot, 0, 5)
      expect(await readCheckpoint(rt.db, slot)).toEqual({ lastSeq: 5, hlc: null })

      // Written, checkpoint moved; the lease ends (the server timed it out) before the commit.
      const inFlight = db.transaction().execute(async (trx) => {
        await sql`insert into fence_probe (id) values (${`${slot}-10`})`.execute(trx)
        await advanceCheckpoint(
          trx,
          slot,
          'FLEET_EVENTS',
          { lastSeq: 5, hlc: null },
          { lastSeq: 10, hlc: null },
        )
        await rt.pool.query('select pg_terminate_backend($1)', [lease.pid])
        await waitFor('the lease to notice', () => lost.length > 0)
      })
      await expect(inFlight).rejects.toBeInstanceOf(SlotLostError)
      await expect(inFlight).rejects.toThrow(
        /slot 'readings-p0' is no longer held by this instance's lock session/,
      )
      expect(await readCheckpoint(rt.db, slot)).toEqual({ lastSeq: 5, hlc: null })
      expect(await probes(slot)).toBe(1)
      // Nothing after it commits either.
      await expect(advance(db, slot, 5, 10)).rejects.toBeInstanceOf(SlotLostError)
      expect(await probes(slot)).toBe(1)
    } finally {
      await lease.close()
    }
  })

  it('a stale owner cannot commit once another instance has taken the slot over', async () => {
    const slot = 'readings-p4'
    const { lease, lost } = await holding(slot)
    const next = await Lease.open(rt.pool, 'readings', () => undefined)
    try {
      const db = fencedDatabase(rt.pool, lease, slot)
      await advance(db, slot, 0, 5) // the first commit pins the lease's session
      await rt.pool.query('select pg_terminate_backend($1)', [lease.pid])
      await waitFor('the lease to notice', () => lost.length > 0)
      expect(await next.join()).toBe(true)
      expect(await next.tryAcquire(slot)).toBe(true)
      // The slot's lock is held again, by the new owner: the old owner's commit still fails.
      await expect(advance(db, slot, 5, 10)).rejects.toBeInstanceOf(SlotLostError)
      expect(await readCheckpoint(rt.db, slot)).toEqual({ lastSeq: 5, hlc: null })
      expect(await probes(slot)).toBe(1)
      // The new owner's own commits go through.
      await advance(fencedDatabase(rt.pool, next, slot), slot, 5, 10)
      expect(await probes(slot)).toBe(2)
    } finally {
      await next.close()
      await lease.close()
    }
  })

  it("keeps its session past the server's idle timeout by speaking on it", async () => {
    const slot = 'readings-p1'
    const { lease, lost } = await holding(slot)
    try {
      const age = async () => {
        const r = await rt.pool.query<{ ms: number }>(
          `select (extract(epoch from now() - backend_start) * 1000)::int as ms
             from pg_stat_activity where pid = $1`,
          [lease.pid],
        )
        return r.rows[0]?.ms ?? -1
      }
      // Gone (-1) ends the wait too: the assertions below tell which.
      await waitFor(
        'the lock session to outlive the lease timeout',
        async () => {
          const ms = await age()
          return ms < 0 || ms > LEASE_TIMEOUT_MS + 3_000
        },
        LEASE_TIMEOUT_MS * 4,
      )
      expect(await age()).toBeGreaterThan(LEASE_TIMEOUT_MS)
      expect(lost).toEqual([])
      await advance(fencedDatabase(rt.pool, lease, slot), slot, 0, 1)
      expect(await probes(slot)).toBe(1)
    } finally {
      await lease.close()
    }
  })

  it('a silent holder: the server ends its lock session, the slot comes free, and the holder is told', async () => {
    const slot = 'readings-p2'
    const errors: Error[] = []
    // Set up as a lease is, but with no heartbeat: what a frozen holder's session looks like.
    const silent = await rt.pool.connect()
    silent.on('error', (err) => errors.push(err))
    const other = await Lease.open(rt.pool, 'readings', () => undefined)
    try {
      await silent.query(`select set_config('idle_session_timeout', $1, false)`, [
        String(LEASE_TIMEOUT_MS),
      ])
      await silent.query(
        `select pg_try_advisory_lock(hashtext('fleetstream-processor'), hashtext($1))`,
        [slot],
      )
      expect(await other.tryAcquire(slot)).toBe(false)
      await waitFor(
        'the slot to come free for another instance',
        () => other.tryAcquire(slot),
        LEASE_TIMEOUT_MS * 4,
      )
      await waitFor('the silent holder to be told', () => errors.length > 0, LEASE_TIMEOUT_MS * 4)
      expect(errors[0]?.message).toMatch(/idle-session timeout/)
    } finally {
      silent.release(true)
      await other.close()
    }
  })

  it('a transaction of a slot left idle is ended by the server, so its row locks hold nobody up', async () => {
    const slot = 'readings-p3'
    const { lease } = await holding(slot)
    try {
      const db = fencedDatabase(rt.pool, lease, slot)
      const held = db.transaction().execute(async (trx) => {
        await sql`insert into fence_probe (id) values (${`${slot}-1`})`.execute(trx)
        const r = await sql<{ pid: number }>`select pg_backend_pid() as pid`.execute(trx)
        const pid = r.rows[0]!.pid
        // Stands still, as a frozen process would, until the server has ended the transaction.
        await waitFor(
          'the idle transaction to be ended',
          async () =>
            (await rt.pool.query('select 1 from pg_stat_activity where pid = $1', [pid]))
              .rowCount === 0,
          LEASE_TIMEOUT_MS * 4,
        )
        await sql`select 1`.execute(trx)
      })
      await expect(held).rejects.toThrow()
      // The row it held is free: another writer gets it at once.
      await rt.pool.query(`insert into fence_probe (id) values ($1)`, [`${slot}-1`])
      expect(await probes(slot)).toBe(1)
    } finally {
      await lease.close()
    }
  })
})
