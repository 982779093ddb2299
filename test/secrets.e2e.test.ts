import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { freshDatabase, startNatsServer, type NatsServer } from './harness/test-servers.ts'
import { freePort } from '../testbed/processes.ts'
import { runCli, spawnCli, testEnv, waitFor } from './fixtures.ts'

/** Every secret the environments below carry; none may appear in any output. */
const SECRETS = {
  natsA: 'NatsSecretA7',
  natsB: 'NatsSecretB8',
  natsPassword: 'NatsPwSecret4',
  db: 'DbSecret1x',
  dbQuery: 'QuerySecret2',
  ssl: 'SslSecret3y',
} as const

function expectNoSecret(output: string): void {
  for (const [name, secret] of Object.entries(SECRETS))
    expect(output, `${name} leaked:\n${output}`).not.toContain(secret)
}

/** `postgres://postgres@host/db` with a password and secret parameters (the test cluster trusts). */
function withSecrets(dbUrl: string): string {
  const u = new URL(dbUrl)
  u.password = SECRETS.db
  return `${u.toString()}?application_name=secrets-test&password=${SECRETS.dbQuery}`
}

/**
 * The real CLI, given configurations full of secrets (passwords in URLs and in lists of them,
 * secret query parameters, NATS_PASSWORD), prints none of them on stdout or stderr, whether the
 * configuration is bad, a server is unreachable, or all goes well.
 */
describe('no secret in any output', () => {
  let nats: NatsServer
  let dbUrl: string

  beforeAll(async () => {
    nats = await startNatsServer()
    dbUrl = await freshDatabase()
  })
  afterAll(async () => {
    await nats.cleanup()
  })

  it('a configuration error names the bad variables, not their secrets (exit 2)', async () => {
    const r = await runCli(['status'], {
      ...testEnv('nats://127.0.0.1:4222', dbUrl),
      DATABASE_URL: `mysql://fleet:${SECRETS.db}@127.0.0.1/db?password=${SECRETS.dbQuery}`,
      NATS_URL: `nats://a:${SECRETS.natsA}@127.0.0.1:1,nats://b:${SECRETS.natsB}@127.0.0.1:2 x`,
      NATS_USER: 'admin',
      NATS_PASSWORD: SECRETS.natsPassword,
    })
    expect(r.code, r.output).toBe(2)
    expect(r.output).toContain("'DATABASE_URL' must match")
    expect(r.output).toContain("'NATS_URL' must match")
    expectNoSecret(r.output)
  })

  it('status names the servers it cannot reach, not their passwords (exit 1)', async () => {
    const [p1, p2, p3] = [await freePort(), await freePort(), await freePort()]
    const r = await runCli(['status', '--timeout', '1', '--window', '0'], {
      ...testEnv(
        `nats://a:${SECRETS.natsA}@127.0.0.1:${p1},nats://b:${SECRETS.natsB}@127.0.0.1:${p2}`,
        `postgres://fleet:${SECRETS.db}@127.0.0.1:${p3}/db?sslpassword=${SECRETS.ssl}&password=${SECRETS.dbQuery}`,
      ),
      NATS_USER: 'admin',
      NATS_PASSWORD: SECRETS.natsPassword,
    })
    expect(r.code, r.output).toBe(1)
    expect(r.output).toContain('cannot reach NATS and PostgreSQL')
    expect(r.output).toContain(`nats://a:***@127.0.0.1:${p1},nats://b:***@127.0.0.1:${p2}`)
    expectNoSecret(r.output)
  })

  it('run logs its waits for NATS without the passwords', async () => {
    const port = await freePort()
    const proc = spawnCli(['run', 'readings', '--no-clock'], {
      ...testEnv(
        `nats://a:${SECRETS.natsA}@127.0.0.1:${port},nats://b:${SECRETS.natsB}@127.0.0.1:${port}`,
        withSecrets(dbUrl),
        { LOG_LEVEL: 'debug' },
      ),
      NATS_USER: 'admin',
      NATS_PASSWORD: SECRETS.natsPassword,
    })
    try {
      await waitFor(
        'run to log a retry of its NATS connection',
        () => /"attempt":2\b.*connect to NATS at/.test(proc.output()),
        30_000,
        proc.output,
      )
    } finally {
      proc.child.kill('SIGTERM')
    }
    await proc.exited
    expect(proc.output()).toContain(`nats://a:***@127.0.0.1:${port}`)
    expectNoSecret(proc.output())
  })

  it('start prints where it runs and how to query it, without a password (exit 0)', async () => {
    const u = new URL(nats.url)
    const r = await runCli(
      ['start', '--duration', '1', '--devices', '3', '--rate', '20'],
      {
        ...testEnv(`nats://fleet:${SECRETS.natsA}@${u.host}`, withSecrets(dbUrl), {
          LOG_LEVEL: 'info',
        }),
        NATS_USER: 'fleet',
        NATS_PASSWORD: SECRETS.natsPassword,
      },
      90_000,
    )
    expect(r.code, r.output).toBe(0)
    expect(r.output).toContain('Query what it wrote:')
    expect(r.output).toContain('psql ')
    expectNoSecret(r.output)
  })
})
