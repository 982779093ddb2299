/**
 * Names a connection's repeated statements, so that Postgres parses them once and keeps their plan.
 *
 * Kysely sends every statement unnamed: Postgres parses it and plans it again at each execution.
 * The processors' statements are the same few texts commit after commit (the projections' CTEs,
 * the checkpoint), so that is repeated work. Measured at a steady 5,000 events/s (the bench's latency
 * rig, `log_min_duration_statement=0` over 2-s windows): the processors' parse and bind (where an
 * unnamed statement is planned) took ~190 ms per window, ~50 with this: ~0.07 of a core of
 * Postgres on the bench's two.
 *
 * As the JDBC driver's `prepareThreshold` does: a parameterised statement is named on its
 * {@link PREPARE_AFTER}th use on a connection, at most {@link MAX_NAMED} per connection (a
 * statement's text with its values inlined would never repeat, and never be named). Not named:
 * - a statement without parameters: node-postgres sends it as a simple query, which may hold several
 *   statements (`begin; set local ...`);
 * - one that returns `*`: after a migration adds a column, Postgres refuses to run a prepared
 *   statement whose result columns changed ("cached plan must not change result type").
 *
 * A prepared statement names its tables as its text does: after a table is renamed and another
 * takes its name (a rebuild's swap), Postgres analyses the statement again and it reaches the new
 * one. Should a named statement's result still change (a column's type altered), the failure is
 * transient: the statement is sent unnamed from then on, and the transaction tried again works.
 */
import type pg from 'pg'
import { TransientError } from '../schemas/errors.ts'

/** Uses of a statement's text on a connection before it is named. */
export const PREPARE_AFTER = 3

/** Statements named per connection, at most (each holds a parse tree and a plan in its backend). */
export const MAX_NAMED = 64

/** Texts counted per connection before the count starts over (texts that do not repeat). */
const MAX_COUNTED = 1000

/** A select list or RETURNING with `*` or `alias.*` (not `count(*)`). */
const STAR = /(?:^|[\s,])(?:"?\w+"?\.)?\*(?=\s|,|$)/

/** A named statement's result columns changed since it was prepared. */
export class StalePreparedStatementError extends TransientError {}

/** Makes `client` name its repeated parameterised statements (see the module comment). */
export function prepareRepeated(client: pg.ClientBase): void {
  const uses = new Map<string, number>()
  const names = new Map<string, string>()
  /** Texts never named on this connection: they return `*`, or their prepared plan went stale. */
  const unnamed = new Set<string>()
  let next = 0
  const query = client.query.bind(client) as (...args: unknown[]) => unknown
  const never = (text: string): void => {
    // Bounded as the counts are; a text forgotten here is judged again on its next uses.
    if (unnamed.size >= MAX_COUNTED) unnamed.clear()
    unnamed.add(text)
  }

  const nameOf = (text: string): string | undefined => {
    const known = names.get(text)
    if (known !== undefined || unnamed.has(text) || names.size >= MAX_NAMED) return known
    const n = (uses.get(text) ?? 0) + 1
    if (n < PREPARE_AFTER) {
      if (uses.size >= MAX_COUNTED) uses.clear()
      uses.set(text, n)
      return undefined
    }
    uses.delete(text)
    if (STAR.test(text)) {
      never(text)
      return undefined
    }
    const name = `fleet_${next++}`
    names.set(text, name)
    return name
  }

  client.query = ((...args: unknown[]) => {
    const [text, values, callback] = args
    if (typeof text !== 'string' || !Array.isArray(values) || values.length === 0 || callback) {
      return query(...args)
    }
    const name = nameOf(text)
    if (name === undefined) return query(text, values)
    return (query({ name, text, values }) as Promise<unknown>).catch((err: unknown) => {
      if (!isStalePlan(err)) throw err
      names.delete(text)
      never(text)
      throw new StalePreparedStatementError(
        `a prepared statement's result columns changed (a migration ran); it is sent unnamed from now on`,
        { cause: err },
      )
    })
  }) as typeof client.query
}

/** "cached plan must not change result type", raised as feature_not_supported (0A000). */
function isStalePlan(err: unknown): boolean {
  return (
    (err as { code?: unknown } | null)?.code === '0A000' &&
    err instanceof Error &&
    /cached plan must not change result type/.test(err.message)
  )
}
