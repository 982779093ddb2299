/** How the CLI reports bad usage (one line and where to read more) and its version. */
import { readFileSync } from 'node:fs'
import type { Command } from 'commander'

/**
 * How commander talks about bad usage, for every command of the tree (those added with
 * `addCommand` inherit nothing, so each is set here): the one problem, prefixed like the CLI's
 * other errors, and where to read more, instead of the whole help; exit codes are left to the
 * caller (`exitOverride`: usage errors exit 2).
 *
 * ```txt
 * $ fleetstream dlq list --bogus
 * fleetstream: unknown option '--bogus'
 * (see 'fleetstream dlq list --help')
 * ```
 */
export function withUsageHints(program: Command): Command {
  const visit = (cmd: Command, path: string) => {
    hints.set(cmd, `(see '${path} --help')`)
    cmd
      .exitOverride()
      .showHelpAfterError(`(see '${path} --help')`)
      .configureOutput({
        outputError: (text, write) => {
          write(text.replace(/^error: /, `${program.name()}: `))
        },
      })
    for (const sub of cmd.commands) visit(sub, `${path} ${sub.name()}`)
  }
  visit(program, program.name())
  program.hook('preAction', (_program, action) => {
    running = action
  })
  return program
}

const hints = new Map<Command, string>()
let running: Command | undefined

/**
 * The hint for a usage error that a command's action finds itself (two options that exclude each
 * other): `(see 'fleetstream dlq redrive --help')`; undefined before any action ran.
 */
export function usageHint(): string | undefined {
  return running === undefined ? undefined : hints.get(running)
}

/**
 * fleetstream's version, from its package.json: found from cli/, from dist/cli/ (tsc's build) and
 * from dist/cli/chunks/ (the bundled CLI, `npm run bundle`) alike.
 */
export function packageVersion(): string {
  for (const rel of ['../package.json', '../../package.json', '../../../package.json']) {
    try {
      const pkg = JSON.parse(readFileSync(new URL(rel, import.meta.url), 'utf8')) as {
        name?: string
        version?: string
      }
      if (pkg.name === 'fleetstream' && pkg.version) return pkg.version
    } catch {
      // not at this level
    }
  }
  return 'unknown'
}
