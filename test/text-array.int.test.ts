import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { textArray } from '../projections/text-array.ts'
import { freshDatabase } from './harness/test-servers.ts'

describe('textArray', () => {
  let client: pg.Client
  beforeAll(async () => {
    client = new pg.Client({ connectionString: await freshDatabase() })
    await client.connect()
  })
  afterAll(async () => {
    await client.end()
  })

  const roundTrip = async (values: string[]) =>
    (await client.query<{ a: string[] }>('select $1::text[] as a', [textArray(values)])).rows[0]?.a

  it('is the array Postgres reads back, element for element', async () => {
    const cases = [
      [],
      ['sensor-00001'],
      ['sensor-00001', 'sensor-00002', '_system'],
      ['', 'NULL', 'null', 'a,b', '{x}', ' spaced ', 'tab\there', 'café', 'new\nline'],
      ['quote"inside', 'back\\slash', 'both\\"'],
    ]
    for (const values of cases)
      expect(await roundTrip(values), JSON.stringify(values)).toEqual(values)
  })

  it('builds the literal itself only where nothing needs escaping', () => {
    expect(textArray(['a', 'b'])).toBe('{"a","b"}')
    expect(textArray([])).toBe('{}')
    const escaped = ['a"b']
    expect(textArray(escaped)).toBe(escaped)
  })
})
