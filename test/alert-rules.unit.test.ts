import { execFileSync } from 'node:child_process'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { defaultAlertRulesPath, loadAlertRules } from '../infra/alert-rules-file.ts'
import { ConfigError } from '../infra/config.ts'
import { parseAlertRules, type AlertRule } from '../projections/alert-rules.ts'
import { ValidationError } from '../schemas/validation.ts'

let dir: string
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'fleetstream-alert-rules-'))
})
afterAll(async () => {
  await rm(dir, { recursive: true, force: true })
})

/** Writes a rules file into the test's directory and returns its path. */
async function rulesFile(name: string, text: string): Promise<string> {
  const path = join(dir, name)
  await writeFile(path, text)
  return path
}

/** The ConfigError `loadAlertRules` throws for a file. */
async function loadError(path: string): Promise<ConfigError> {
  const err: unknown = await loadAlertRules(path).then(
    () => undefined,
    (e: unknown) => e,
  )
  expect(err).toBeInstanceOf(ConfigError)
  return err as ConfigError
}

describe('default alert rules', () => {
  it('load and normalize to exactly the shipped rules, deeply frozen', async () => {
    const path = defaultAlertRulesPath()
    expect(path).toBe(join(import.meta.dirname, '..', 'config', 'alert-rules.yaml'))

    const rules = await loadAlertRules(path)

    const threshold = { kind: 'threshold', includeHeartbeatBattery: false, forSeconds: 0 } as const
    expect(rules).toEqual({
      rules: [
        {
          ...threshold,
          id: 'temperature-high',
          severity: 'critical',
          metric: 'temperature',
          direction: 'above',
          raiseAt: 45,
          clearAt: 40,
          consecutive: 3,
        },
        {
          ...threshold,
          id: 'temperature-low',
          severity: 'warning',
          metric: 'temperature',
          direction: 'below',
          raiseAt: -10,
          clearAt: -5,
          consecutive: 3,
        },
        {
          ...threshold,
          id: 'humidity-high',
          severity: 'warning',
          metric: 'humidity',
          direction: 'above',
          raiseAt: 90,
          clearAt: 85,
          consecutive: 5,
          forSeconds: 60,
        },
        {
          kind: 'threshold',
          id: 'battery-low',
          severity: 'warning',
          metric: 'battery',
          includeHeartbeatBattery: true,
          direction: 'below',
          raiseAt: 15,
          clearAt: 20,
          consecutive: 1,
          forSeconds: 0,
        },
        { kind: 'silent', id: 'sensor-silent', severity: 'warning' },
      ] satisfies AlertRule[],
    })
    expect(Object.isFrozen(rules)).toBe(true)
    expect(Object.isFrozen(rules.rules)).toBe(true)
    for (const rule of rules.rules) expect(Object.isFrozen(rule)).toBe(true)
  })

  it('are found from the build too (dist/infra/…)', () => {
    const built = pathToFileURL(join(import.meta.dirname, '..', 'dist/infra/alert-rules-file.js'))
    const printed = execFileSync(
      process.execPath,
      [
        '--input-type=module',
        '-e',
        `const m = await import(${JSON.stringify(built.href)}); console.log(m.defaultAlertRulesPath())`,
      ],
      { encoding: 'utf8' },
    )
    expect(printed.trim()).toBe(defaultAlertRulesPath())
  })
})

describe('alert rules validation', () => {
  it('normalizes battery-low to a threshold below on battery percent, heartbeats included', () => {
    const rules = parseAlertRules({
      rules: [
        { id: 'battery-low', kind: 'battery-low', below: 15, clear: 20, severity: 'warning' },
        {
          id: 'battery-critical',
          kind: 'battery-low',
          below: 5,
          clear: 10,
          consecutive: 2,
          forSeconds: 300,
          severity: 'critical',
        },
      ],
    })
    expect(rules.rules).toEqual([
      {
        kind: 'threshold',
        id: 'battery-low',
        severity: 'warning',
        metric: 'battery',
        includeHeartbeatBattery: true,
        direction: 'below',
        raiseAt: 15,
        clearAt: 20,
        consecutive: 1,
        forSeconds: 0,
      },
      {
        kind: 'threshold',
        id: 'battery-critical',
        severity: 'critical',
        metric: 'battery',
        includeHeartbeatBattery: true,
        direction: 'below',
        raiseAt: 5,
        clearAt: 10,
        consecutive: 2,
        forSeconds: 300,
      },
    ])
  })

  it('accepts an empty rule list', () => {
    expect(parseAlertRules({ rules: [] })).toEqual({ rules: [] })
  })

  it('reports every problem of a file in one error, each naming field, rule and value', async () => {
    const path = await rulesFile(
      'many-problems.yaml',
      `rules:
  - id: temperature-high
    kind: threshold
    metric: temperature
    above: 40
    clear: 45                # on the wrong side
    consecutive: 2.5         # not an integer
    severity: critical
  - id: temperature-high     # used already
    kind: threshold
    metric: temperature
    above: 40
    below: 0                 # both above and below
    clear: 35
    severity: warning
  - id: humidity-high
    kind: threshold
    metric: humidity
    above: ninety            # not a number
    clear: 85
    consecutive: 0           # below 1
    forSeconds: .inf         # not finite
    severity: urgent         # not a severity
    colour: red              # unknown field
  - id: pressure-rate
    kind: rate               # unknown kind
    severity: info
  - id: battery-low
    kind: battery-low
    below: 15
    clear: 10                # on the wrong side
    severity: warning
  - id: Pressure High        # bad id
    kind: threshold
    metric: pressure
    clear: 1000              # neither above nor below
    severity: info
  - id: battery-low          # used already
    kind: silent
    severity: warning
`,
    )

    const err = await loadError(path)

    expect(err.problems).toEqual([
      "'rules[0].consecutive' must be an integer, got 2.5",
      "'rules[0].clear' must be below 'above' (40), got 45",
      "'rules[1].below' must be absent when 'above' is given, got 0",
      "'rules[2].above' must be a number, got 'ninety'",
      "'rules[2].consecutive' must be at least 1, got 0",
      "'rules[2].forSeconds' must be a finite number, got Infinity",
      "'rules[2].severity' must be one of 'info', 'warning', 'critical', got 'urgent'",
      "'rules[2].colour' is not a known field, got 'red'",
      "'rules[3].kind' must be one of 'threshold', 'battery-low', 'silent', got 'rate'",
      "'rules[4].clear' must be above 'below' (15), got 10",
      "'rules[5].id' must match /^[a-z0-9-]{1,64}$/, got 'Pressure High'",
      "'rules[5].above' is required unless 'below' is given, got nothing",
      "'rules[1].id' must be unique (already used by rules[0]), got 'temperature-high'",
      "'rules[6].id' must be unique (already used by rules[4]), got 'battery-low'",
    ])
    expect(err.message).toMatch(
      new RegExp(`^invalid alert rules in ${escape(path)}: 'rules\\[0\\]`),
    )
  })

  it('throws a ValidationError from the pure parser', () => {
    expect(() =>
      parseAlertRules({
        rules: [{ id: 'b', kind: 'battery-low', below: 120, clear: 20, above: 5 }],
      }),
    ).toThrow(
      new ValidationError(
        [
          "'rules[0].below' must be at most 100, got 120",
          "'rules[0].severity' is required (one of 'info', 'warning', 'critical')",
          "'rules[0].above' is not a known field, got 5",
        ],
        'alert rules',
      ),
    )
    expect(() => parseAlertRules(null)).toThrow("'(root)' must be an object, got null")
    expect(() => parseAlertRules({ rules: 'none' })).toThrow("'rules' must be an array, got 'none'")
    expect(() =>
      parseAlertRules({ rules: [5, { id: 'a', kind: 'silent', severity: 'info', x: 1 }] }),
    ).toThrow("invalid alert rules: 'rules[0]' must be an object, got 5; 'rules[1].x' is not a")
    expect(() => parseAlertRules({ rules: [], extra: 1 })).toThrow(
      "'extra' is not a known field, got 1",
    )
  })

  it('accepts JSON, which is YAML', async () => {
    const path = await rulesFile(
      'rules.json',
      JSON.stringify({ rules: [{ id: 'quiet', kind: 'silent', severity: 'info' }] }),
    )
    expect(await loadAlertRules(path)).toEqual({
      rules: [{ kind: 'silent', id: 'quiet', severity: 'info' }],
    })
  })
})

describe('alert rules file', () => {
  it('reports a missing file as a configuration error naming it', async () => {
    const path = join(dir, 'missing.yaml')
    const err = await loadError(path)
    expect(err.problems).toEqual([`'ALERT_RULES_FILE' file cannot be read: '${path}' (ENOENT)`])
    expect(err.message).toBe(
      `invalid configuration: 'ALERT_RULES_FILE' file cannot be read: '${path}' (ENOENT)`,
    )
  })

  it('reports YAML syntax errors with file, line and column', async () => {
    const path = await rulesFile(
      'broken.yaml',
      `rules:
  - id: sensor-silent
    kind: silent
    kind: silent
  - id: other
   severity: warning
`,
    )
    const err = await loadError(path)
    expect(err.problems).toEqual([
      `'${path}' is not valid YAML at line 4, column 5: Map keys must be unique`,
      `'${path}' is not valid YAML at line 6, column 1: Sequence item without - indicator`,
    ])
    expect(err.message).toContain(`invalid alert rules in ${path}: `)
  })

  it('reports an empty file', async () => {
    const err = await loadError(await rulesFile('empty.yaml', '# nothing yet\n'))
    expect(err.problems).toEqual(["'(root)' must be an object, got null"])
  })

  it('reports an alias to a missing anchor', async () => {
    const path = await rulesFile('alias.yaml', 'rules: *missing\n')
    const err = await loadError(path)
    expect(err.problems).toHaveLength(1)
    expect(err.problems[0]).toMatch(new RegExp(`^'${escape(path)}' is not valid YAML: .*missing`))
  })
})

function escape(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')
}
