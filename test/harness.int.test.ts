import { jetstreamManager } from '@nats-io/jetstream'
import { connect } from '@nats-io/transport-node'
import pg from 'pg'
import { afterAll, describe, expect, it } from 'vitest'
import {
  type NatsServer,
  type PgCluster,
  freshDatabase,
  startNatsServer,
  startPostgres,
} from './harness/test-servers.ts'

async function selectOne(url: string): Promise<unknown> {
  const client = new pg.Client({ connectionString: url })
  await client.connect()
  try {
    const { rows } = await client.query<{ one: number }>('select 1 as one')
    return rows[0]?.one
  } finally {
    await client.end()
  }
}

const cleanups: (() => Promise<void>)[] = []

afterAll(async () => {
  await Promise.all(cleanups.map((cleanup) => cleanup()))
})

describe('startNatsServer', () => {
  let ns: NatsServer

  it('starts a JetStream server on a random port', async () => {
    ns = await startNatsServer()
    cleanups.push(() => ns.cleanup())
    expect(ns.port).not.toBe(4222)
    expect(ns.url).toBe(`nats://127.0.0.1:${ns.port}`)
  })

  it('keeps streams across a SIGKILL and a restart on the same port', async () => {
    const stream = `harness_${Math.random().toString(36).slice(2, 10)}`
    const nc = await connect({ servers: ns.url })
    try {
      const jsm = await jetstreamManager(nc)
      await jsm.streams.add({ name: stream, subjects: [`${stream}.>`] })
    } finally {
      await nc.close()
    }
    const { port, pid } = ns

    await ns.kill('SIGKILL')
    await ns.restart()

    expect(ns.port).toBe(port)
    expect(ns.pid).not.toBe(pid)
    const again = await connect({ servers: ns.url })
    try {
      const jsm = await jetstreamManager(again)
      const info = await jsm.streams.info(stream)
      expect(info.config.name).toBe(stream)
    } finally {
      await again.close()
    }
  })
})

describe('freshDatabase', () => {
  it('creates a database on the shared cluster that answers queries', async () => {
    const url = await freshDatabase()
    expect(url).toMatch(/^postgres:\/\/postgres@127\.0\.0\.1:\d+\/t_[0-9a-f]{8}$/)
    expect(await selectOne(url)).toBe(1)
  })
})

describe('startPostgres', () => {
  it('answers queries again after stop and start on the same port', async () => {
    const cluster: PgCluster = await startPostgres()
    cleanups.push(() => cluster.cleanup())
    expect(cluster.port).not.toBe(5432)
    const url = await cluster.createDatabase()
    expect(await selectOne(url)).toBe(1)

    await cluster.stop('immediate')
    await expect(selectOne(url)).rejects.toThrow()
    await cluster.start()

    expect(await selectOne(url)).toBe(1)
  })

  it('keeps every acknowledged commit through a crash (stop -m immediate)', async () => {
    const cluster: PgCluster = await startPostgres()
    cleanups.push(() => cluster.cleanup())
    const url = await cluster.createDatabase()
    const client = new pg.Client({ connectionString: url })
    await client.connect()
    await client.query('create table t (n int)')
    // Commits one by one, then the crash at once: none may be waiting in Postgres' WAL buffers
    // (with synchronous_commit off the last ones were lost, and the processors applied them again).
    for (let n = 1; n <= 200; n++) await client.query('insert into t values ($1)', [n])
    client.on('error', () => undefined) // the crash ends its connection
    await cluster.stop('immediate')
    await client.end().catch(() => undefined)
    await cluster.start()

    const again = new pg.Client({ connectionString: url })
    await again.connect()
    try {
      const { rows } = await again.query<{ n: number }>('select count(*)::int as n from t')
      expect(rows[0]?.n).toBe(200)
    } finally {
      await again.end()
    }
  })
})

describe('a machine without the servers', () => {
  it('fails with a message that says what is missing and how to get it', async () => {
    const path = process.env.PATH
    process.env.PATH = '/nonexistent'
    try {
      await expect(startNatsServer()).rejects.toThrow(
        "nats-server not found on PATH: install it with 'apt-get install nats-server' (or run 'bash .ci/run')",
      )
    } finally {
      process.env.PATH = path
    }
  })
})
