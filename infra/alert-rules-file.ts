import { readFileSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { LineCounter, parseDocument } from 'yaml'
import { parseAlertRules, type AlertRules } from '../projections/alert-rules.ts'
import { ValidationError } from '../schemas/validation.ts'
import { ConfigError } from './config.ts'

/**
 * The rules shipped with fleetstream: `<package root>/config/alert-rules.yaml`. The package root
 * is found by walking up from this module, so this works from the sources (`infra/`) and from the
 * build (`dist/infra/`) alike.
 */
export function defaultAlertRulesPath(): string {
  return join(packageRoot(), 'config', 'alert-rules.yaml')
}

/**
 * Reads, parses (YAML, which also accepts JSON) and validates a rules file.
 *
 * ```ts
 * const rules = await loadAlertRules(config.alertRulesFile ?? defaultAlertRulesPath())
 * ```
 *
 * @throws {ConfigError} when the file cannot be read, is not valid YAML, or breaks the rules
 *   schema; each lists every problem at once.
 */
export async function loadAlertRules(path: string): Promise<AlertRules> {
  let text: string
  try {
    text = await readFile(path, 'utf8')
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? String(err)
    const error = new ConfigError(
      [`'ALERT_RULES_FILE' file cannot be read: '${path}' (${code})`],
      'configuration',
    )
    error.cause = err
    throw error
  }
  const what = `alert rules in ${path}`
  const lines = new LineCounter()
  const doc = parseDocument(text, { lineCounter: lines, prettyErrors: false })
  // Warnings too (an unresolved tag silently becomes a string): configuration is read strictly.
  const yamlProblems = [...doc.errors, ...doc.warnings].map((e) => {
    const { line, col } = lines.linePos(e.pos[0])
    return `'${path}' is not valid YAML at line ${line}, column ${col}: ${e.message}`
  })
  if (yamlProblems.length > 0) throw new ConfigError(yamlProblems, what)
  let data: unknown
  try {
    data = doc.toJS()
  } catch (err) {
    // Aliases are resolved here: an unknown anchor, or too many expansions (a YAML bomb).
    const error = new ConfigError(
      [`'${path}' is not valid YAML: ${err instanceof Error ? err.message : String(err)}`],
      what,
    )
    error.cause = err
    throw error
  }
  try {
    return parseAlertRules(data)
  } catch (err) {
    if (!(err instanceof ValidationError)) throw err
    throw new ConfigError(err.problems, what)
  }
}

function packageRoot(): string {
  const start = dirname(fileURLToPath(import.meta.url))
  let dir = start
  while (!isFleetstreamPackage(join(dir, 'package.json'))) {
    const parent = dirname(dir)
    if (parent === dir) {
      throw new ConfigError(
        [`'ALERT_RULES_FILE' is required: no fleetstream package.json above '${start}'`],
        'configuration',
      )
    }
    dir = parent
  }
  return dir
}

function isFleetstreamPackage(file: string): boolean {
  try {
    return (JSON.parse(readFileSync(file, 'utf8')) as { name?: unknown }).name === 'fleetstream'
  } catch {
    return false
  }
}
