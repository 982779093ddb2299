import type pg from 'pg'
import pino from 'pino'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { isTransient } from '../infra/failures.ts'
import { createPool } from '../infra/database.ts'
import {
  MAX_NAMED,
  PREPARE_AFTER,
  StalePreparedStatementError,
} from '../infra/prepared-statements.ts'
import { freshDatabase } from './harness/test-servers.ts'

/**
 * Every pool of ours names a connection's repeated parameterised statements
 * (infra/prepared-statements.ts): Postgres parses and plans them once. Checked on the server, in
 * `pg_prepared_statements` of the connection itself.
 */
describe('prepared statements', () => {
  let pool: pg.Pool
  let client: pg.PoolClient

  beforeAll(async () => {
    pool = createPool(await freshDatabase(), { max: 1, log: pino({ level: 'silent' }) })
  })
  afterAll(async () => {
    await pool.end()
  })
  beforeEach(async () => {
    // One connection per test: its statements are its own.
    client = await pool.connect()
    await client.query('drop table if exists t, t_old')
    await client.query('create table t (id int primary key, v text)')
    client.release(true)
    client = await pool.connect()
    return () => {
      client.release(true)
    }
  })

  const prepared = async (): Promise<string[]> =>
    (
      await client.query<{ statement: string }>(
        'select statement from pg_prepared_statements order by name',
      )
    ).rows.map((r) => r.statement)

  it(`names a parameterised statement on its use number ${PREPARE_AFTER}, once`, async () => {
    const text = 'insert into t (id, v) values ($1, $2)'
    for (let i = 1; i < PREPARE_AFTER; i++) await client.query(text, [i, 'x'])
    expect(await prepared()).toEqual([])
    for (let i = PREPARE_AFTER; i < PREPARE_AFTER + 5; i++) await client.query(text, [i, 'x'])
    expect(await prepared()).toEqual([text])
    const { rows } = await client.query<{ n: number }>('select count(*)::int as n from t')
    expect(rows[0]?.n).toBe(PREPARE_AFTER + 4)
  })

  it('never names a statement without parameters, several statements, or one returning *', async () => {
    for (let i = 0; i < PREPARE_AFTER + 2; i++) {
      await client.query('select 1')
      await client.query('begin; set local statement_timeout = 1000; commit')
      await client.query('select * from t where id = $1', [i])
      await client.query('insert into t (id, v) values ($1, $2) returning *', [i, 'x'])
      await client.query('select t.* from t where id = $1', [i])
    }
    expect(await prepared()).toEqual([])
    // count(*) returns one column whatever the table holds: named.
    for (let i = 0; i < PREPARE_AFTER; i++) {
      await client.query('select count(*) from t where id > $1', [i])
    }
    expect(await prepared()).toEqual(['select count(*) from t where id > $1'])
  })

  it(`names at most ${MAX_NAMED} statements per connection; the rest run unnamed`, async () => {
    for (let s = 0; s < MAX_NAMED + 10; s++) {
      for (let i = 0; i < PREPARE_AFTER; i++) {
        await client.query(`select v from t where id = $1 and ${s} = ${s}`, [i])
      }
    }
    expect(await prepared()).toHaveLength(MAX_NAMED)
  })

  it('follows a table renamed away and another created in its name (a rebuild swap)', async () => {
    const text = 'insert into t (id, v) values ($1, $2)'
    for (let i = 1; i <= PREPARE_AFTER; i++) await client.query(text, [i, 'old'])
    expect(await prepared()).toEqual([text])
    await client.query('alter table t rename to t_old')
    await client.query('create table t (id int primary key, v text)')
    await client.query(text, [100, 'new'])
    const count = async (table: string) =>
      (await client.query<{ n: number }>(`select count(*)::int as n from ${table}`)).rows[0]?.n
    expect(await count('t')).toBe(1)
    expect(await count('t_old')).toBe(PREPARE_AFTER)
  })

  it('a value Postgres refuses fails a named statement as it would an unnamed one', async () => {
    const text = 'insert into t (id, v) values ($1, $2)'
    for (let i = 1; i <= PREPARE_AFTER; i++) await client.query(text, [i, 'ok'])
    expect(await prepared()).toEqual([text])
    // Out of int4's range, and a NUL byte: the event's fault (a data error), never transient.
    for (const values of [
      [2 ** 31, 'x'],
      [10, 'nul\u0000byte'],
    ]) {
      const err = await client.query(text, values).then(
        () => undefined,
        (e: unknown) => e,
      )
      expect(err).not.toBeInstanceOf(StalePreparedStatementError)
      expect((err as { code?: string }).code).toMatch(/^22/)
      expect(isTransient(err)).toBe(false)
    }
    await client.query(text, [11, 'after'])
    const { rows } = await client.query<{ n: number }>('select count(*)::int as n from t')
    expect(rows[0]?.n).toBe(PREPARE_AFTER + 1)
    expect(await prepared()).toEqual([text])
  })

  it('a named statement whose result changed fails as transient, then runs unnamed', async () => {
    const text = 'select v from t where id = $1'
    await client.query('insert into t (id, v) values (1, $1)', ['a'])
    for (let i = 0; i < PREPARE_AFTER; i++) await client.query(text, [1])
    expect(await prepared()).toEqual([text])
    await client.query('alter table t alter column v type int using 7')
    const err = await client.query(text, [1]).then(
      () => undefined,
      (e: unknown) => e,
    )
    expect(err).toBeInstanceOf(StalePreparedStatementError)
    expect(isTransient(err)).toBe(true)
    const { rows } = await client.query<{ v: number }>(text, [1])
    expect(rows).toEqual([{ v: 7 }])
  })
})
