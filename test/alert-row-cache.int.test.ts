import { sql, type Kysely, type Transaction } from 'kysely'
import type pg from 'pg'
import pino from 'pino'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { createKysely, createPool } from '../infra/database.ts'
import { onOneConnection } from '../processors/admin/copy-in.ts'
import { alertsProjection } from '../projections/alerts.ts'
import { parseAlertRules } from '../projections/alert-rules.ts'
import type { CopySend } from '../projections/copy-rows.ts'
import { anyEvents, type AnyProjection } from '../projections/projection.ts'
import { migrateTo } from '../projections/migrate.ts'
import type { Database } from '../projections/tables.ts'
import type { FleetEvent } from '../schemas/events.ts'
import { encodeHlc } from '../schemas/hlc.ts'
import { freshDatabase } from './harness/test-servers.ts'
import { temperatureReading, TEMPERATURE_HIGH } from './fixtures.ts'

/**
 * The alerts projection keeps what it wrote for the next batch (projections/row-cache.ts). What it
 * keeps must never outlive the rows it mirrors: after a rolled back batch, a savepoint rolled back,
 * another instance writing the same sensors, or a tick in the same transaction, the tables must be
 * exactly what a projection that keeps nothing (a new one per batch) makes of the committed events.
 *
 * Each scenario runs twice: its transactions as a test's (the inputs go by insert), and as a
 * processor's commits, which can COPY (the inputs go by COPY under a savepoint, by insert when one
 * is stored already). The projection that keeps nothing always inserts.
 */
const RULES = parseAlertRules({
  rules: [TEMPERATURE_HIGH, { id: 'sensor-silent', kind: 'silent', severity: 'warning' }],
})
const T0 = 1_795_000_000_000
const TIMEOUT_SECONDS = 60
const DEVICE = 'sensor-3'

function reading(id: string, atSeconds: number, value: number): FleetEvent {
  return temperatureReading(DEVICE, id, T0, atSeconds, value)
}

function tick(atSeconds: number): FleetEvent {
  const at = new Date(T0 + atSeconds * 1000).toISOString()
  return {
    eventId: `tick-${atSeconds}`,
    deviceId: '_system',
    type: 'clock.ticked',
    version: 1,
    occurredAt: at,
    hlc: encodeHlc({ wallMs: T0 + atSeconds * 1000, logical: 0, node: 'clock' }),
    correlationId: `c-tick-${atSeconds}`,
    data: { at, intervalSeconds: 10 },
  }
}

const TABLES = alertsProjection({ rules: RULES, defaultTimeoutSeconds: TIMEOUT_SECONDS }).tables

/** A step of a scenario: a batch committed, or one whose transaction rolls back. */
interface Step {
  readonly events: readonly FleetEvent[]
  /** Rolled back after the projection applied it. */
  readonly rolledBack?: true
  /** Applied, rolled back to a savepoint, then `events` applied in the same transaction. */
  readonly undoneFirst?: readonly FleetEvent[]
  /** Applied by another instance of the projection (another process holding the slot). */
  readonly byOther?: true
}

class RolledBack extends Error {}

describe.each([
  { inputs: 'by insert', copying: false },
  { inputs: 'by COPY', copying: true },
])('the alerts projection keeps only what it committed (inputs $inputs)', ({ copying }) => {
  let pool: pg.Pool
  let db: Kysely<Database>
  beforeAll(async () => {
    pool = createPool(await freshDatabase(), { max: 2, log: pino({ level: 'silent' }) })
    db = createKysely<Database>(pool)
    await migrateTo(db as Kysely<unknown>)
  })
  afterAll(async () => {
    await db.destroy()
  })
  beforeEach(async () => {
    await sql`truncate ${sql.join(TABLES.map((t) => sql.table(t)))}`.execute(db)
  })

  const projection = () =>
    anyEvents(alertsProjection({ rules: RULES, defaultTimeoutSeconds: TIMEOUT_SECONDS }))
  /** Each event at the same stream sequence in both runs: its place in the scenario. */
  const seqs = new Map<string, number>()
  const projected = (events: readonly FleetEvent[]) =>
    events.map((event) => {
      const streamSeq = seqs.get(event.eventId) ?? seqs.size + 1
      seqs.set(event.eventId, streamSeq)
      return { event, streamSeq, ingestedAt: new Date(T0) }
    })

  /** Runs the steps with one long-lived projection (and another one for `byOther` steps). */
  async function run(steps: readonly Step[], fresh: boolean): Promise<unknown> {
    const mine = projection()
    const other = projection()
    for (const s of steps) {
      const p: AnyProjection = fresh ? projection() : s.byOther ? other : mine
      const batch = (trx: Transaction<Database>, copy?: CopySend) =>
        (async () => {
          if (s.undoneFirst !== undefined) {
            await sql`savepoint undone`.execute(trx)
            await p.apply(trx, projected(s.undoneFirst), copy)
            await sql`rollback to savepoint undone`.execute(trx)
          }
          await p.apply(trx, projected(s.events), copy)
          if (s.rolledBack) throw new RolledBack()
        })()
      await (
        copying && !fresh
          ? onOneConnection(pool, (one, copy) =>
              one.transaction().execute((trx) => batch(trx, copy)),
            )
          : db.transaction().execute((trx) => batch(trx))
      ).catch((err: unknown) => {
        if (!(err instanceof RolledBack)) throw err
      })
    }
    const out: Record<string, unknown> = {}
    for (const t of TABLES) {
      const rows = (await sql<Record<string, unknown>>`select * from ${sql.table(t)}`.execute(db))
        .rows
      out[t] = rows.map((r) => JSON.stringify(r)).sort()
    }
    return out
  }

  /** The scenario's tables, checked against a projection that keeps nothing between batches. */
  async function expectExact(steps: readonly Step[]): Promise<unknown> {
    const kept = await run(steps, false)
    await sql`truncate ${sql.join(TABLES.map((t) => sql.table(t)))}`.execute(db)
    // What committed: neither the batches rolled back nor what a savepoint undid.
    const fresh = await run(
      steps.filter((s) => !s.rolledBack).map((s) => ({ events: s.events })),
      true,
    )
    expect(kept).toEqual(fresh)
    return kept
  }

  it('after a rolled back batch, reads the sensor again', async () => {
    const out = (await expectExact([
      { events: [reading('r1', 1, 45)] },
      { events: [reading('r2', 2, 46)], rolledBack: true },
      { events: [reading('r3', 3, 30)] },
      { events: [reading('r4', 4, 47)] },
    ])) as { alerts: string[] }
    expect(out.alerts).toEqual([])
  })

  it('after a savepoint rolled back, reads the sensor again', async () => {
    await expectExact([
      { events: [reading('r1', 1, 45)] },
      { events: [reading('r3', 3, 30)], undoneFirst: [reading('r2', 2, 46)] },
      { events: [reading('r4', 4, 47)] },
      { events: [reading('r5', 5, 48)] },
    ])
  })

  it('after another instance wrote the sensor, reads it again', async () => {
    const out = (await expectExact([
      // A sensor's first fold reads everything: the second is the first this one keeps.
      { events: [reading('r0', 0, 20)] },
      { events: [reading('r1', 1, 45)] },
      { events: [reading('r2', 2, 46)], byOther: true },
      { events: [reading('r3', 3, 30)] },
    ])) as { alerts: string[] }
    expect(out.alerts).toHaveLength(1)
    expect(out.alerts[0]).toContain('"state":"resolved"')
  })

  it('read again, a rule skips a second reading at the HLC it evaluated last, as when kept', async () => {
    // r1b has r1's HLC (another event): evaluated after r1, it is skipped. The newest reading a
    // rule evaluated is not stored (alert_conditions holds the breach alone): read again, it is
    // derived from the kept readings. Had it been lost, r1b would make the second breaching
    // reading in a row and raise.
    const out = (await expectExact([
      { events: [reading('r0', 0, 20)] },
      { events: [reading('r1', 1, 45)] },
      { events: [reading('r1b', 1, 46)] },
      { events: [reading('r2', 2, 30)] },
      { events: [reading('r3', 3, 45)] },
      { events: [reading('r4', 4, 46)] },
    ])) as { alerts: string[]; alert_conditions: string[] }
    expect(out.alerts).toHaveLength(1)
    expect(out.alerts[0]).toContain('"raised_event_id":"r4"')
    // the breach goes on while the alert is open
    expect(out.alert_conditions).toHaveLength(1)
    expect(out.alert_conditions[0]).toContain('"consecutive":2')
  })

  it('after a late reading folds the sensor again in full, goes on from where that fold ended', async () => {
    // r2 arrives after r3: the sensor is folded again from its start, r2-r3 make the run that
    // raises, and what that fold ends with is kept. The next batches fold on from it: r4 and r5
    // go on in the open alert (no second raise), r6 resolves it.
    const out = (await expectExact([
      { events: [reading('r1', 1, 20)] },
      { events: [reading('r3', 3, 46)] },
      { events: [reading('r2', 2, 45)] },
      { events: [reading('r4', 4, 47)] },
      { events: [reading('r5', 5, 48)] },
      { events: [reading('r6', 6, 30)] },
    ])) as { alerts: string[]; alert_conditions: string[] }
    expect(out.alerts).toHaveLength(1)
    expect(out.alerts[0]).toContain('"raised_event_id":"r3"')
    expect(out.alerts[0]).toContain('"resolved_event_id":"r6"')
    expect(out.alert_conditions).toEqual([])
  })

  it('a batch holding a reading stored already (re-published) stores the others once, and folds on', async () => {
    const out = (await expectExact([
      { events: [reading('r1', 1, 45)] },
      { events: [reading('r1', 1, 45), reading('r2', 2, 46)] },
      { events: [reading('r2', 2, 46), reading('r3', 3, 47), reading('r3', 3, 47)] },
      { events: [reading('r4', 4, 30)] },
    ])) as { alerts: string[]; alert_inputs: string[] }
    expect(out.alert_inputs).toHaveLength(4)
    expect(out.alerts).toHaveLength(1)
    expect(out.alerts[0]).toContain('"raised_event_id":"r2"')
    expect(out.alerts[0]).toContain('"resolved_event_id":"r4"')
  })

  it('a tick in the batch silences what it kept, and it is heard again after', async () => {
    const out = (await expectExact([
      { events: [reading('r1', 1, 45)] },
      { events: [reading('r2', 2, 46), tick(100), reading('r3', 101, 47)] },
      { events: [reading('r4', 102, 30), tick(300)] },
      { events: [reading('r5', 301, 31)] },
    ])) as { alerts: string[] }
    expect(out.alerts.length).toBeGreaterThanOrEqual(2)
  })
})
