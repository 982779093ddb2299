import { execFile } from 'node:child_process'
import { readFile } from 'node:fs/promises'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { repoRoot, runCli, testEnv } from './fixtures.ts'
import { freshDatabase, startRoleNatsServer, type RoleNatsServer } from './harness/test-servers.ts'

/**
 * Runs a printed command line as a user pasting it would: `bash -c`, in a new shell that has only
 * what README.md tells the user to export.
 */
function paste(
  line: string,
  exported: Record<string, string>,
): Promise<{ code: number; out: string }> {
  return new Promise((resolve) => {
    execFile(
      'bash',
      ['-c', line],
      { env: { PATH: process.env.PATH ?? '', HOME: '/nonexistent', ...exported }, timeout: 30_000 },
      (err, stdout, stderr) => {
        const code = err === null ? 0 : typeof err.code === 'number' ? err.code : 1
        resolve({ code, out: stdout + stderr })
      },
    )
  })
}

/** The `$NAME`s a command line reads from the environment. */
function variables(line: string): string[] {
  return [...line.matchAll(/\$\{?([A-Z_][A-Z0-9_]*)/g)].map((m) => m[1] ?? '')
}

describe('commands printed for copy-paste run as printed and show no secret', () => {
  let ns: RoleNatsServer
  let env: Record<string, string>
  let databaseUrl: string
  const pgPassword = 'Pg-secret-4f7a9c'
  let readme: string
  beforeAll(async () => {
    ns = await startRoleNatsServer()
    // The test cluster trusts local logins, so a URL with a password works and holds a secret.
    const url = new URL(await freshDatabase())
    url.password = pgPassword
    databaseUrl = url.toString()
    env = { ...testEnv(ns.url, databaseUrl), ...ns.env('admin') }
    readme = await readFile(`${repoRoot}/README.md`, 'utf8')
  })
  afterAll(async () => ns.cleanup())

  /** Variables README.md tells the user to export for the printed commands. */
  function documented(): string[] {
    return [...readme.matchAll(/^export ([A-Z_]+)=/gm)].map((m) => m[1] ?? '')
  }

  it("start's summary: psql lines run, nats lines use the saved context, no password shown", async () => {
    const r = await runCli(
      ['start', '--devices', '2', '--rate', '20', '--duration', '2', '--seed', '3'],
      env,
      120_000,
    )
    expect(r.code, r.output).toBe(0)
    expect(r.output).not.toContain(pgPassword)
    expect(r.output).not.toContain(env.NATS_PASSWORD)

    const commands = r.output
      .split('\n')
      .filter((l) => /^ {2}(psql|nats|npm) /.test(l))
      .map((l) => l.trim())
    const psql = commands.filter((c) => c.startsWith('psql '))
    const nats = commands.filter((c) => c.startsWith('nats '))
    expect(psql).toHaveLength(3)
    expect(nats).toHaveLength(4)

    // Every variable a printed command reads is one README.md tells the user to export.
    const exported = documented()
    expect(exported).toEqual(expect.arrayContaining(['DATABASE_URL', 'NATS_PASSWORD']))
    for (const c of commands) {
      for (const v of variables(c)) expect(exported, c).toContain(v)
    }
    // In a new shell with what README.md says to export, each psql line runs and answers.
    for (const c of psql) {
      const run = await paste(c, { DATABASE_URL: databaseUrl })
      expect(run.code, `${c}\n${run.out}`).toBe(0)
      expect(run.out).toMatch(/\(\d+ rows?\)/)
    }
    // No nats CLI here: the shape. The context is saved once; the others use it, with no login.
    const [save, ...uses] = nats
    expect(save).toMatch(
      /^nats context save fleetstream --server '[^']+' --user admin --password "\$NATS_PASSWORD" --inbox-prefix _INBOX_admin {3}# once$/,
    )
    for (const c of uses) {
      expect(c).toMatch(/^nats --context fleetstream (stream|consumer) /)
      expect(c).not.toMatch(/--password|--user/)
    }
    // The saved context is the README's too.
    expect(readme).toContain('nats context save fleetstream')
  })

  it("rebuild's clean-up command runs as printed and drops the retired tables", async () => {
    const r = await runCli(['rebuild', 'readings'], env, 120_000)
    expect(r.code, r.output).toBe(0)
    expect(r.output).not.toContain(pgPassword)
    const line = r.output
      .split('\n')
      .find((l) => l.trim().startsWith('psql '))
      ?.trim()
    expect(line, r.output).toMatch(/^psql "\$DATABASE_URL" -c 'drop schema retired_\w+ cascade'$/)
    const schema = /drop schema (\w+)/.exec(line ?? '')?.[1] ?? ''

    const run = await paste(line ?? '', { DATABASE_URL: databaseUrl })
    expect(run.code, run.out).toBe(0)
    const db = new pg.Client(databaseUrl)
    await db.connect()
    const left = await db.query('select 1 from pg_namespace where nspname = $1', [schema])
    await db.end()
    expect(left.rowCount).toBe(0)
  })
})
