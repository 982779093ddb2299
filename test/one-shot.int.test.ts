import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Runtime } from '../app/runtime.ts'
import type { NatsServer } from './harness/test-servers.ts'
import { cliSystem, deadPort, runCli, spawnCli, waitFor } from './fixtures.ts'

function withDatabase(url: string, f: (u: URL) => void): string {
  const u = new URL(url)
  f(u)
  return u.toString()
}

describe('one-shot commands: only what they use, bounded, honest exit codes', () => {
  let nats: NatsServer
  let rt: Runtime
  let env: Record<string, string>
  let deadNats: string
  let deadPostgres: string
  beforeAll(async () => {
    ;({ nats, env, rt } = await cliSystem())
    deadNats = `nats://127.0.0.1:${await deadPort()}`
    const port = await deadPort()
    deadPostgres = withDatabase(env.DATABASE_URL ?? '', (u) => {
      u.port = String(port)
    })
  })
  afterAll(async () => {
    await rt.close()
    await nats.cleanup()
  })

  it('alerts list works with NATS down: it does not use NATS', async () => {
    const r = await runCli(['alerts', 'list'], { ...env, NATS_URL: deadNats }, 30_000)
    expect(r.code, r.output).toBe(0)
    expect(r.output).toContain('no alerts')
  })

  it('dlq list works with PostgreSQL down: it does not use PostgreSQL', async () => {
    const r = await runCli(['dlq', 'list'], { ...env, DATABASE_URL: deadPostgres }, 30_000)
    expect(r.code, r.output).toBe(0)
    expect(r.output).toMatch(/FLEET_DLQ: 0 parked/)
  })

  it('simulate works with PostgreSQL down: it publishes into NATS only', async () => {
    const r = await runCli(
      ['simulate', '--devices', '2', '--rate', '20', '--duration', '1', '--seed', '1'],
      { ...env, DATABASE_URL: deadPostgres },
      30_000,
    )
    expect(r.code, r.output).toBe(0)
    expect(r.output).toMatch(/^sent \d+ events/m)
  })

  it('alerts list gives up on an unreachable PostgreSQL after --timeout, exit 1, with the reason', async () => {
    const r = await runCli(
      ['alerts', 'list', '--timeout', '2'],
      { ...env, DATABASE_URL: deadPostgres },
      30_000,
    )
    expect(r.code, r.output).toBe(1)
    expect(r.output).toMatch(
      /cannot reach PostgreSQL at postgres:\/\/.* within 2 s: .*ECONNREFUSED/,
    )
    // Bounded: a retry loop would outlive runCli's 30 s and exit with a signal, not 1. (No wall
    // clock here: process start-up alone takes seconds on a loaded machine.)
  })

  it('a PostgreSQL role that does not exist is a configuration error: exit 2 at once', async () => {
    const url = withDatabase(env.DATABASE_URL ?? '', (u) => {
      u.username = 'no_such_role'
    })
    const r = await runCli(['alerts', 'list'], { ...env, DATABASE_URL: url }, 30_000)
    expect(r.code, r.output).toBe(2)
    expect(r.output).toMatch(/'DATABASE_URL' user 'no_such_role' was refused by PostgreSQL/)
    expect(r.output).toMatch(/does not exist/)
    expect(r.output).not.toMatch(/retrying/)
  })

  it('status with a PostgreSQL role that does not exist exits 2 too, as for a refused NATS login', async () => {
    const url = withDatabase(env.DATABASE_URL ?? '', (u) => {
      u.username = 'no_such_role'
    })
    const r = await runCli(['status', '--timeout', '5'], { ...env, DATABASE_URL: url }, 30_000)
    expect(r.code, r.output).toBe(2)
    expect(r.output).toMatch(/'DATABASE_URL' user 'no_such_role' was refused by PostgreSQL/)
  })

  it('alerts list against a mistyped database says so and does not create it', async () => {
    const name = `${new URL(env.DATABASE_URL ?? '').pathname.slice(1)}_typo`
    const url = withDatabase(env.DATABASE_URL ?? '', (u) => {
      u.pathname = `/${name}`
    })
    const r = await runCli(['alerts', 'list'], { ...env, DATABASE_URL: url })
    expect(r.code, r.output).toBe(1)
    expect(r.output).toContain(`no database '${name}' at postgres://`)
    expect(r.output).toContain('(run setup first)')
    expect(r.output).not.toMatch(/42P01/)
    const admin = new pg.Client({
      connectionString: withDatabase(env.DATABASE_URL ?? '', (u) => {
        u.pathname = '/postgres'
      }),
    })
    await admin.connect()
    try {
      const found = await admin.query(
        'select count(*)::int as n from pg_database where datname = $1',
        [name],
      )
      expect(found.rows[0]).toEqual({ n: 0 })
    } finally {
      await admin.end()
    }
  })

  it('a one-shot command interrupted while waiting for a dependency exits 130', async () => {
    const p = spawnCli(['alerts', 'list', '--timeout', '120'], {
      ...env,
      DATABASE_URL: deadPostgres,
    })
    try {
      await waitFor(
        'the command to wait for PostgreSQL',
        () => /retrying/.test(p.output()),
        20_000,
        p.output,
      )
      p.child.kill('SIGINT')
      expect(await p.exited, p.output()).toBe(130)
    } finally {
      p.child.kill('SIGKILL')
    }
  })
})
