import { execFileSync } from 'node:child_process'
import { join } from 'node:path'
import type { TestProject } from 'vitest/node'
import { HarnessError } from '../../testbed/processes.ts'
import { startPostgres } from '../../testbed/postgres.ts'

declare module 'vitest' {
  export interface ProvidedContext {
    /** Port of the one throwaway Postgres cluster shared by the whole run. */
    pgPort: number
  }
}

/**
 * Runs once per `vitest run`: compiles the project and bundles the CLI (some tests spawn it), and
 * starts one throwaway Postgres cluster; test files each create their own database on it with
 * `freshDatabase()`.
 */
export default async function setup({
  provide,
  config,
}: TestProject): Promise<() => Promise<void>> {
  build(config.root)
  const cluster = await startPostgres()
  provide('pgPort', cluster.port)
  return () => cluster.cleanup()
}

function build(root: string): void {
  try {
    // The project's own compiler, run by this node: no npx look-up, no registry fallback.
    execFileSync(
      process.execPath,
      [join(root, 'node_modules/typescript/bin/tsc'), '-p', 'tsconfig.build.json'],
      {
        cwd: root,
        encoding: 'utf8',
        stdio: 'pipe',
      },
    )
    // tsc wrote the unbundled CLI over dist/cli/fleetstream.js: spawn what users run, the bundle.
    execFileSync('npm', ['run', '--silent', 'bundle'], {
      cwd: root,
      encoding: 'utf8',
      stdio: 'pipe',
    })
  } catch (err) {
    const { status, stdout, stderr } = err as {
      status: number | null
      stdout?: string
      stderr?: string
    }
    throw new HarnessError(
      `'tsc -p tsconfig.build.json' or 'npm run bundle' failed (exit ${String(status)}) in ${root}:\n${stdout ?? ''}${stderr ?? ''}`,
      { cause: err },
    )
  }
}
