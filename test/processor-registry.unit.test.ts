import { describe, expect, it } from 'vitest'
import { ConfigError, loadConfig } from '../infra/config.ts'
import { loadProcessors, PROCESSOR_NAMES } from '../processors/processor-registry.ts'

/** A rules file that cannot be read: loading the alerts processor fails on it. */
const missingRules = loadConfig({ ALERT_RULES_FILE: '/nonexistent/alert-rules.yaml' })

describe('loadProcessors', () => {
  it('loads every processor by default, the alert rules included', async () => {
    const specs = await loadProcessors(loadConfig({}))
    expect(Object.keys(specs)).toEqual([...PROCESSOR_NAMES])
    for (const name of PROCESSOR_NAMES) expect(specs[name].name).toBe(name)
    await expect(loadProcessors(missingRules)).rejects.toBeInstanceOf(ConfigError)
  })

  it('builds only the processors asked for: readings alone does not read the alert rules', async () => {
    const specs = await loadProcessors(missingRules, ['readings'])
    expect(Object.keys(specs)).toEqual(['readings'])
    expect(Object.values(specs).map((s) => s.name)).toEqual(['readings'])
    expect(specs.readings.name).toBe('readings')
    expect(() => specs.alerts).toThrow('the alerts processor is not loaded in this process')
    expect(() => specs['sensor-status']).toThrow(/not loaded/)
  })

  it('reads the alert rules when alerts is among them', async () => {
    await expect(loadProcessors(missingRules, ['sensor-status', 'alerts'])).rejects.toThrow(
      /ALERT_RULES_FILE/,
    )
    const specs = await loadProcessors(loadConfig({}), ['alerts', 'sensor-status'])
    expect(Object.keys(specs)).toEqual(['sensor-status', 'alerts'])
  })
})
