import { BrokenCircuitError } from 'cockatiel'
import { describe, expect, it } from 'vitest'
import { isDataError, isTransient } from '../infra/failures.ts'

const pgError = (code: string) => Object.assign(new Error(`pg ${code}`), { code })

describe('failure classification', () => {
  it('outages, races and restarts are transient: retried, never parked', () => {
    for (const err of [
      new BrokenCircuitError(), // the breaker is open: the outage itself
      pgError('08006'), // connection failure
      pgError('40001'), // serialization failure
      pgError('40P01'), // deadlock
      pgError('57P01'), // admin shutdown
      pgError('57P03'), // cannot connect now (starting up)
      pgError('53300'), // too many connections
      pgError('42P01'), // undefined table: a broken deployment, not a bad event
      pgError('ECONNREFUSED'),
      new Error('Connection terminated unexpectedly'),
      Object.assign(new Error('timeout'), { name: 'TimeoutError' }),
      Object.assign(new Error('no responders'), { name: 'JetStreamNotEnabled' }),
      new Error('not committed after 5 attempts', { cause: pgError('08006') }),
    ]) {
      expect(isTransient(err), String(err)).toBe(true)
    }
  })

  it('what the same input would fail on again is deterministic: a poison candidate', () => {
    for (const err of [
      pgError('22003'), // numeric value out of range
      pgError('23505'), // unique violation
      new TypeError("Cannot read properties of undefined (reading 'value')"),
      new RangeError('666 is not a temperature'),
      'a string',
      undefined,
    ]) {
      expect(isTransient(err), String(err)).toBe(false)
    }
  })

  it("a value Postgres refuses is the event's fault; a broken projection is not", () => {
    for (const err of [
      pgError('22021'), // invalid byte sequence: U+0000
      pgError('22008'), // date/time field value out of range
      pgError('22003'), // numeric value out of range
      pgError('23514'), // check violation
      pgError('54000'), // program limit exceeded: index row too large
      new Error('wrapped', { cause: pgError('22P05') }),
    ]) {
      expect(isDataError(err), String(err)).toBe(true)
    }
    for (const err of [
      pgError('23502'), // not-null violation: the projection left a required value out
      pgError('42P01'), // undefined table
      pgError('42703'), // undefined column
      pgError('08006'),
      new TypeError("Cannot read properties of undefined (reading 'value')"),
      undefined,
    ]) {
      expect(isDataError(err), String(err)).toBe(false)
    }
  })
})
