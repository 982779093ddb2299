import { jetstreamManager } from '@nats-io/jetstream'
import { connect } from '@nats-io/transport-node'
import pg from 'pg'
import { createServer, type Server } from 'node:net'
import { afterAll, describe, expect, it } from 'vitest'
import { freePort, onFreePorts } from '../testbed/processes.ts'
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

/** A port held by this process until `close`, as another process would hold it. */
async function holdPort(): Promise<{ port: number; server: Server }> {
  const server = createServer()
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const address = server.address()
  if (address === null || typeof address !== 'object') throw new Error('no address')
  return { port: address.port, server }
}

describe('onFreePorts', () => {
  it('starts a server again on fresh ports when one it picked was taken meanwhile', async () => {
    const held = await holdPort()
    const monitors: number[] = []
    try {
      const ns = await onFreePorts(async () => {
        // The first pick is one another process took after it was picked.
        const monitor = monitors.length === 0 ? held.port : await freePort()
        monitors.push(monitor)
        return startNatsServer({ extraConfig: `http: "127.0.0.1:${monitor}"` })
      })
      cleanups.push(() => ns.cleanup())
      expect(monitors).toHaveLength(2)
      expect(monitors[0]).toBe(held.port)
      const res = await fetch(`http://127.0.0.1:${monitors[1]}/varz`)
      expect(res.status).toBe(200)
    } finally {
      held.server.close()
    }
  })

  it('gives up after three attempts, and at once on any other failure', async () => {
    let calls = 0
    const taken = onFreePorts(() => {
      calls++
      return Promise.reject(new Error('listen tcp 127.0.0.1:1: bind: address already in use'))
    })
    await expect(taken).rejects.toThrow('address already in use')
    expect(calls).toBe(3)
    calls = 0
    const other = onFreePorts(() => {
      calls++
      return Promise.reject(new Error('nats-server not found'))
    })
    await expect(other).rejects.toThrow('nats-server not found')
    expect(calls).toBe(1)
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
