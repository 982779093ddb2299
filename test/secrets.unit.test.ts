import { describe, expect, it } from 'vitest'
import { ConfigError, loadConfig } from '../infra/config.ts'
import { environmentSecrets, redact, redactValue } from '../infra/redact.ts'

/** The error `loadConfig` throws for this environment. */
function configError(env: Record<string, string>): string {
  try {
    loadConfig(env)
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError)
    return (err as Error).message
  }
  throw new Error('expected a configuration error')
}

describe('redact', () => {
  it('hides the password of a URL and keeps the user, host and path', () => {
    expect(redact('postgres://fleet:s3cret-pw@db:5432/fleetstream', [])).toBe(
      'postgres://fleet:***@db:5432/fleetstream',
    )
    expect(redact('at nats://processor:pw-1234@n1:4222 now', [])).toBe(
      'at nats://processor:***@n1:4222 now',
    )
  })

  it('hides the credentials of every URL of a list', () => {
    expect(redact('nats://a:pw-aaaa@n1:4222,nats://b:pw-bbbb@n2:4222,tls://c:pw-cccc@n3', [])).toBe(
      'nats://a:***@n1:4222,nats://b:***@n2:4222,tls://c:***@n3',
    )
    // Hosts of a list without a scheme of their own.
    expect(redact('nats://a:pw-aaaa@n1:4222,n2:4222', [])).toBe('nats://a:***@n1:4222,n2:4222')
    expect(redact('nats://n0:4222,b:pw-bbbb@n2:4222', [])).toBe('nats://***@n2:4222')
  })

  it('hides a NATS token in a URL, but not a Postgres user name', () => {
    expect(redact('nats://s3cr3t-token@n1:4222', [])).toBe('nats://***@n1:4222')
    expect(redact('postgres://postgres@127.0.0.1:5432/x', [])).toBe(
      'postgres://postgres@127.0.0.1:5432/x',
    )
  })

  it('hides secret query parameters and keeps the others', () => {
    expect(
      redact(
        'postgres://app@db/x?sslmode=require&password=q-pw-1&sslpassword=q-pw-2&application_name=a',
        [],
      ),
    ).toBe('postgres://app@db/x?sslmode=require&password=***&sslpassword=***&application_name=a')
    expect(redact('wss://h/ws?token=tk-123&pass=p-456&user=u', [])).toBe(
      'wss://h/ws?token=***&pass=***&user=u',
    )
    expect(redact('connect with password=abc123 user=admin', [])).toBe(
      'connect with password=*** user=admin',
    )
  })

  it('hides given secrets wherever they appear, as written and JSON-escaped', () => {
    expect(redact('refused: pw "x\\y" and pw-plain here', ['x\\y"z', 'pw-plain'])).toBe(
      'refused: pw "x\\y" and *** here',
    )
    expect(redact(JSON.stringify({ err: 'got a"b\\c' }), ['a"b\\c'])).toBe('{"err":"got ***"}')
  })

  it('leaves text without secrets alone', () => {
    const text = "status: lag 50 > --max-lag 0; nats://127.0.0.1:4222 as 'admin'"
    expect(redact(text, [])).toBe(text)
  })
})

describe('environmentSecrets', () => {
  it('finds secret variables and the passwords inside URL variables', () => {
    const secrets = environmentSecrets({
      NATS_PASSWORD: 'np-secret',
      NATS_TOKEN: 'nt-secret',
      PGPASSWORD: 'pg-secret',
      NATS_USER: 'admin',
      DATABASE_URL: 'postgres://u:db%40secret@h/x?sslpassword=ssl-secret&sslmode=require',
      NATS_URL: 'nats://a:na-secret@n1,nats://b:nb-secret@n2',
      LOG_LEVEL: 'info',
    })
    expect([...secrets].sort()).toEqual(
      [
        'db%40secret',
        'db@secret',
        'na-secret',
        'nb-secret',
        'np-secret',
        'nt-secret',
        'pg-secret',
        'ssl-secret',
      ].sort(),
    )
  })
})

describe('redactValue', () => {
  it('hides the whole value of a secret variable', () => {
    expect(redactValue('NATS_PASSWORD', 'anything')).toBe('***')
  })

  it('hides credentials of a URL that does not parse (white space in it)', () => {
    expect(redactValue('DATABASE_URL', 'postgres://u:pa ss@h/x')).toBe('postgres://u:***@h/x')
    expect(redactValue('NATS_URL', 'nats://a:p 1@n1,nats://b:p 2@n2')).toBe(
      'nats://a:***@n1,nats://b:***@n2',
    )
  })
})

describe('loadConfig errors', () => {
  it('name a bad DATABASE_URL without its password or secret parameters', () => {
    const message = configError({
      DATABASE_URL: 'mysql://fleet:Db-Secret-1@127.0.0.1/db?password=Query-Secret-2',
    })
    expect(message).toContain("'DATABASE_URL' must match")
    expect(message).toContain("got 'mysql://fleet:***@127.0.0.1/db?password=***'")
    expect(message).not.toMatch(/Db-Secret|Query-Secret/)
  })

  it('name a bad NATS_URL list without any of its passwords', () => {
    const message = configError({
      NATS_URL: 'nats://a:Nats-Secret-A@n1:4222,nats://b:Nats-Secret-B@n2:4222,bad url',
    })
    expect(message).toContain("'NATS_URL' must match")
    expect(message).not.toMatch(/Nats-Secret/)
  })

  it('never show the start of a password when a long value is cut to length', () => {
    const host = `${'h'.repeat(60)}.example`
    const message = configError({
      DATABASE_URL: `postgres://fleet:Long-Secret-Value@${host}/db x`,
    })
    expect(message).toContain('postgres://fleet:***@hhh')
    expect(message).not.toMatch(/Long|Secret/)
  })

  it('hide a password given with a spaced URL even when another variable is bad too', () => {
    const message = configError({
      DATABASE_URL: 'postgres://fleet:pa ss-word-9@h/x',
      HLC_MAX_OFFSET_MS: 'soon',
    })
    expect(message).toContain("'HLC_MAX_OFFSET_MS' must be")
    expect(message).not.toMatch(/ss-word-9|pa ss/)
  })
})
