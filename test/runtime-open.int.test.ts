import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { openRuntime } from '../app/runtime.ts'
import { createLogger } from '../infra/logger.ts'
import { freshDatabase, startRoleNatsServer, type RoleNatsServer } from './harness/test-servers.ts'
import { deadPort, rulesFile, runCli, testConfig, testEnv } from './fixtures.ts'

/**
 * openRuntime waits for NATS and PostgreSQL at the same time (app/runtime.ts): a definite answer
 * from one ends the wait for the other, and a database found at once costs one connection.
 */
describe('opening a runtime: NATS and PostgreSQL waited for together', () => {
  let ns: RoleNatsServer
  let databaseUrl: string
  beforeAll(async () => {
    ns = await startRoleNatsServer()
    databaseUrl = await freshDatabase()
  })
  afterAll(async () => {
    await ns.cleanup()
  })

  it('run: a refused NATS login exits 2 at once, though PostgreSQL is unreachable', async () => {
    const dead = new URL(databaseUrl)
    dead.port = String(await deadPort())
    const env = {
      ...testEnv(ns.url, dead.toString(), { ALERT_RULES_FILE: await rulesFile() }),
      ...ns.env('processor'),
      NATS_PASSWORD: 'wrong-password-42',
    }
    const r = await runCli(['run', 'readings', '--no-clock'], env, 30_000)
    expect(r.code, r.output).toBe(2)
    expect(r.output).toContain(`was refused by NATS at`)
  })

  it('creates a missing database, then uses it', async () => {
    const url = new URL(databaseUrl)
    url.pathname = `/${url.pathname.slice(1)}_created`
    const config = testConfig(ns.url, url.toString(), { ...ns.env('processor') })
    const rt = await openRuntime(config, createLogger({ level: 'silent', name: 'test' }), {
      name: 'test-open',
    })
    try {
      const { rows } = await rt.pool.query<{ db: string }>('select current_database() as db')
      expect(rows[0]?.db).toBe(url.pathname.slice(1))
    } finally {
      await rt.close()
    }
    const admin = new URL(databaseUrl)
    admin.pathname = '/postgres'
    const client = new pg.Client({ connectionString: admin.toString() })
    await client.connect()
    await client.query(`drop database if exists "${url.pathname.slice(1)}"`)
    await client.end()
  })
})
