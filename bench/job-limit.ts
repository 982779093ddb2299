import pg from 'pg'
import type { ThresholdRule } from '../projections/alert-rules.ts'
import { trimAfter, WINDOW_READINGS } from '../projections/alerts.ts'
import { hlcTime } from '../projections/sensor-lifecycle.ts'
import { type BenchEvent, BenchError } from './common.ts'

/**
 * (d) the job's write limit: the rows the three read models hold for the bench's workload (every
 * event is a `reading.recorded`), written by hand with the fastest set-based SQL we know, into a
 * database migrated with fleetstream's own migrations: same tables, same keys, same conflict
 * clauses, no NATS, no framework.
 *
 * Per batch and per read model, one transaction of three round trips: `begin`; one COPY of the
 * batch (text format, one payload) into a temp table; then every upsert of that read model and its
 * checkpoint as `INSERT ... SELECT ... ON CONFLICT` statements in one simple query that ends with
 * `commit`. The three read models run at once, each on its own connection, as the three processor
 * processes do: what Postgres absorbs for all three together on this machine is the limit the
 * processors share (run one after the other, each would have both cores to itself and the sum of
 * their times would overstate what the job costs when they run side by side, and understate
 * nothing: the concurrent run is the honest limit).
 *
 * What each read model holds for readings, and how it is written here:
 * - readings: `readings` (insert, do nothing on a known event id), `readings_per_minute` (upsert
 *   of the inserted rows' counts), `latest_readings` (upsert of the newest per sensor and metric,
 *   moving only to a newer (HLC, event id));
 * - sensor-status: `sensor_status` (upsert of each sensor of the batch: created active by its
 *   earliest reading, else last seen moved to its newest), and for a sensor created by the batch
 *   its `first` point in `sensor_status_timeline` and its "first seen" row in
 *   `sensor_status_history`;
 * - alerts: `alert_sensors` and `alert_sensors_timeline` as above, `alert_inputs` (a row per
 *   reading and threshold rule of its metric), `alert_tips` (per sensor) and, once a sensor's
 *   reading inputs since its last trim reach its trim point (`trimAfter` in
 *   projections/alerts.ts: between the window, 64 with the default rules, and twice it, times the
 *   threshold rules), the
 *   trimming to that window: `alert_horizons` upserted, older `alert_inputs` deleted. The
 *   bench's readings stay inside every rule's range (checked before the run), so no rule is in a
 *   breach (`alert_conditions` holds none) and no alert or notification row is written, as in the
 *   processors' run.
 *
 * The trimming follows the projection batch by batch (a sensor is folded again in full, and
 * trimmed, when it is new or its new inputs since the last trim reach its trim point), so the
 * inputs kept depend on the batches when one batch holds several readings of a sensor. With at
 * least as many sensors as events in a batch, here ({@link JOB_BATCH}) and in the processors
 * (PROCESSOR_BATCH_SIZE, 1000 by default), no batch does, and the rows are the processors' own
 * (the bench's default 10,000 sensors; a million events is 100 readings per sensor). With fewer
 * sensors, `alert_inputs` may differ by a few rows per sensor, and the row comparison says so.
 */
export interface JobLimit {
  readonly seconds: number
  /** Seconds each read model's connection took, in parallel with the others. */
  readonly perModel: Readonly<Record<JobModel, number>>
  readonly batch: number
}

export type JobModel = 'readings' | 'sensor-status' | 'alerts'

/** Events per transaction: the upper end of what the issue allows (1000-5000). */
export const JOB_BATCH = 5000

const IN_COLUMNS = `event_id text, device_id text, metric text, value float8, unit text,
  occurred_at timestamptz, hlc text collate "C", hlc_at timestamptz, correlation_id text,
  causation_id text, stream_seq int8, ingested_at timestamptz, trim_after int4`

/** The earliest and the newest reading of each sensor in the batch (order: HLC, then event id). */
const FIRST_LAST = `
  firsts as (select distinct on (device_id) * from job_in
             order by device_id, hlc, event_id collate "C"),
  lasts as (select distinct on (device_id) * from job_in
            order by device_id, hlc desc, event_id collate "C" desc)`

/**
 * A sensor-state table (`sensor_status`, `alert_sensors`) and its timeline: the CTEs `firsts`,
 * `lasts`, `up` (the upsert, saying which rows it created) and `tl` (their `first` points).
 */
function sensorState(table: 'sensor_status' | 'alert_sensors'): string {
  return `with ${FIRST_LAST},
  up as (
    insert into ${table} as s (device_id, status, status_hlc, status_event_id,
      status_correlation_id, status_changed_at, last_seen_at, last_seen_hlc, last_seen_event_id)
    select f.device_id, 'active', f.hlc, f.event_id, f.correlation_id, f.hlc_at,
           l.hlc_at, l.hlc, l.event_id
    from firsts f join lasts l using (device_id)
    on conflict (device_id) do update set last_seen_at = excluded.last_seen_at,
      last_seen_hlc = excluded.last_seen_hlc, last_seen_event_id = excluded.last_seen_event_id
    where s.last_seen_hlc < excluded.last_seen_hlc
       or (s.last_seen_hlc = excluded.last_seen_hlc
           and s.last_seen_event_id < excluded.last_seen_event_id collate "C")
    returning device_id, (xmax = 0) as created
  ),
  tl as (
    insert into ${table}_timeline (device_id, event_id, kind, hlc, at, correlation_id,
      causation_id, stream_seq)
    select f.device_id, f.event_id, 'first', f.hlc, f.hlc_at, f.correlation_id, f.causation_id,
           f.stream_seq
    from firsts f join up using (device_id) where up.created
    on conflict (device_id, event_id) do nothing
  )`
}

function statements(model: JobModel, rules: readonly ThresholdRule[]): string {
  switch (model) {
    case 'readings':
      return `
      with inserted as (
        insert into readings (event_id, device_id, metric, value, unit, occurred_at, hlc,
                              correlation_id, causation_id, stream_seq, ingested_at)
        select event_id, device_id, metric, value, unit, occurred_at, hlc, correlation_id,
               causation_id, stream_seq, ingested_at from job_in
        on conflict (event_id) do nothing
        returning device_id, metric, value, occurred_at
      )
      insert into readings_per_minute as r (device_id, metric, minute, count, min, max, sum)
      select device_id, metric, date_bin('1 minute', occurred_at, timestamptz '2000-01-01 00:00:00+00'),
             count(*), min(value), max(value), sum(value::numeric)
      from inserted group by 1, 2, 3
      on conflict (device_id, metric, minute) do update set
        count = r.count + excluded.count, min = least(r.min, excluded.min),
        max = greatest(r.max, excluded.max), sum = r.sum + excluded.sum;
      insert into latest_readings as l (device_id, metric, value, unit, occurred_at, hlc, event_id,
                                        correlation_id, stream_seq)
      select distinct on (device_id, metric) device_id, metric, value, unit, occurred_at, hlc,
             event_id, correlation_id, stream_seq
      from job_in order by device_id, metric, hlc desc, event_id collate "C" desc
      on conflict (device_id, metric) do update set
        value = excluded.value, unit = excluded.unit, occurred_at = excluded.occurred_at,
        hlc = excluded.hlc, event_id = excluded.event_id, correlation_id = excluded.correlation_id,
        stream_seq = excluded.stream_seq
      where l.hlc < excluded.hlc
         or (l.hlc = excluded.hlc and l.event_id < excluded.event_id collate "C");`
    case 'sensor-status':
      return `${sensorState('sensor_status')}
      insert into sensor_status_history (device_id, event_id, stream_seq, from_status, to_status,
        hlc, changed_at, correlation_id, causation_id, reason)
      select f.device_id, f.event_id, f.stream_seq, null, 'active', f.hlc, f.hlc_at,
             f.correlation_id, f.causation_id, 'first seen'
      from firsts f join up using (device_id) where up.created
      on conflict (device_id, event_id) do nothing;`
    case 'alerts': {
      const ruleRows = rules.map((r) => `(${literal(r.id)}, ${literal(r.metric)})`).join(', ')
      // Without threshold rules there are no inputs: nothing to add or to trim.
      const ruleTable = ruleRows === '' ? '' : `(values ${ruleRows}) as r (rule_id, metric)`
      return `${sensorState('alert_sensors')} select count(*) from up;
      ${tips(ruleTable)}
      ${ruleTable === '' ? '' : prune(alertWindow(rules))}`
    }
  }
}

/**
 * The alerts projection's window: readings kept per sensor and threshold rule past its horizon.
 * The processors run with the default (no `windowReadings` option).
 */
export function alertWindow(rules: readonly ThresholdRule[]): number {
  return Math.max(WINDOW_READINGS, ...rules.map((r) => 2 * r.consecutive))
}

/**
 * `alert_inputs` (a row per reading and threshold rule of its metric, do nothing on a known one)
 * and `alert_tips`, as the alerts projection writes them for readings alone: a tip for each sensor
 * of the batch that got inputs or is new to the read model, moved to the newest of its old tip,
 * its new inputs and (new sensor) its `first` point; its `history` the digest of its status
 * history, which for these sensors is that one `first` transition (null -> active); its
 * `readings_since_prune` reset to 0 when the projection folds it again in full (new sensor, its
 * trim point reached: `job_in.trim_after`, or an input at or before the tip), else grown by the
 * batch's new inputs.
 */
function tips(ruleTable: string): string {
  const added =
    ruleTable === ''
      ? `added as (select null::text as device_id, null::text as hlc, null::text as event_id
                   where false)`
      : `added as (
          insert into alert_inputs (device_id, rule_id, event_id, kind, hlc, correlation_id, value,
                                    alert_id, acknowledged_by)
          select j.device_id, r.rule_id, j.event_id, 'reading', j.hlc, j.correlation_id, j.value,
                 null, null
          from job_in j join ${ruleTable} using (metric)
          on conflict (device_id, rule_id, event_id) do nothing
          returning device_id, hlc, event_id
        )`
  // sha256 of `${hlc}\0${eventId}\0${from ?? ''}\0${to}\x01` per transition, base64url.
  const digest = `translate(rtrim(encode(sha256(convert_to(x.f_hlc, 'UTF8') || decode('00', 'hex')
      || convert_to(x.f_event, 'UTF8') || decode('0000', 'hex') || convert_to('active', 'UTF8')
      || decode('01', 'hex')), 'base64'), '='), '+/', '-_')`
  return `with ${added},
  firsts as (select distinct on (device_id) device_id, hlc, event_id, trim_after from job_in
             order by device_id, hlc, event_id collate "C"),
  fed as (select device_id, count(*) as fresh from added group by device_id),
  newest as (select distinct on (device_id) device_id, hlc, event_id from added
             order by device_id, hlc desc, event_id collate "C" desc),
  oldest as (select distinct on (device_id) device_id, hlc, event_id from added
             order by device_id, hlc, event_id collate "C"),
  x as (
    select d.device_id, t.hlc as t_hlc, t.event_id as t_event, t.history,
           t.readings_since_prune as rsp, coalesce(fed.fresh, 0) as fresh,
           n.hlc as n_hlc, n.event_id as n_event, o.hlc as o_hlc, o.event_id as o_event,
           f.hlc as f_hlc, f.event_id as f_event, f.trim_after
    from (select device_id from fed
          union select device_id from firsts
          where not exists (select from alert_tips t where t.device_id = firsts.device_id)) d
    left join alert_tips t using (device_id) left join fed using (device_id)
    left join newest n using (device_id) left join oldest o using (device_id)
    left join firsts f using (device_id)
  )
  insert into alert_tips as t (device_id, hlc, event_id, history, readings_since_prune)
  select x.device_id, p.hlc, p.event_id, coalesce(x.history, ${digest}),
         case when x.t_hlc is null or x.rsp + x.fresh >= x.trim_after
                or (x.o_hlc, x.o_event collate "C") <= (x.t_hlc, x.t_event collate "C") then 0
              else x.rsp + x.fresh end
  from x cross join lateral (
    select v.hlc, v.event_id from (values (x.t_hlc, x.t_event), (x.n_hlc, x.n_event),
      (case when x.t_hlc is null then x.f_hlc end, x.f_event)) as v (hlc, event_id)
    where v.hlc is not null order by v.hlc collate "C" desc, v.event_id collate "C" desc limit 1
  ) p
  on conflict (device_id) do update set hlc = excluded.hlc, event_id = excluded.event_id,
    history = excluded.history, readings_since_prune = excluded.readings_since_prune;`
}

/**
 * The projection's window trimming: a sensor folded again in full (its tip's
 * `readings_since_prune` is 0 after {@link tips}) keeps its newest `window` readings per rule;
 * the horizon moves to the reading before them, with the state after it (no reading breaches,
 * so a reset condition and no open alert), and the readings up to it are deleted.
 */
function prune(window: number): string {
  return `with kept as (
    select i.device_id, i.rule_id, i.hlc, i.event_id,
           row_number() over (partition by i.device_id, i.rule_id
                              order by i.hlc desc, i.event_id collate "C" desc) as n
    from alert_inputs i
    where i.kind = 'reading' and i.device_id in (
      select t.device_id from alert_tips t
      where t.readings_since_prune = 0 and t.device_id in (select device_id from job_in))
  ),
  h as (
    insert into alert_horizons as h (device_id, rule_id, hlc, event_id, state)
    select device_id, rule_id, hlc, event_id,
           jsonb_build_object('condition', jsonb_build_object('consecutive', 0, 'sinceMs', null,
             'sinceHlc', null, 'lastHlc', hlc), 'open', null)
    from kept where n = ${window + 1}
    on conflict (device_id, rule_id) do update set hlc = excluded.hlc,
      event_id = excluded.event_id, state = excluded.state
    returning device_id, rule_id, hlc, event_id
  )
  delete from alert_inputs i using h
  where i.device_id = h.device_id and i.rule_id = h.rule_id and i.kind = 'reading'
    and (i.hlc < h.hlc collate "C"
         or (i.hlc = h.hlc collate "C" and i.event_id collate "C" <= h.event_id collate "C"));`
}

/** A SQL string literal of our own constants (rule ids, metric names). */
function literal(s: string): string {
  return `'${s.replaceAll("'", "''")}'`
}

/** A value in COPY's text format. */
function cell(v: string | number | null): string {
  if (v === null) return '\\N'
  const s = String(v)
  return /[\\\t\n\r]/.test(s)
    ? s
        .replaceAll('\\', '\\\\')
        .replaceAll('\t', '\\t')
        .replaceAll('\n', '\\n')
        .replaceAll('\r', '\\r')
    : s
}

/** One batch as a COPY text payload, in `job_in`'s column order. */
function payload(
  events: readonly BenchEvent[],
  firstSeq: number,
  ingestedAt: string,
  window: number,
  fedRules: number,
): Buffer {
  let out = ''
  for (let i = 0; i < events.length; i++) {
    const e = (events[i] as BenchEvent).event
    out +=
      [
        e.eventId,
        e.deviceId,
        e.data.metric,
        e.data.value,
        e.data.unit,
        e.occurredAt,
        e.hlc,
        hlcTime(e.hlc).toISOString(),
        e.correlationId,
        e.causationId ?? null,
        firstSeq + i,
        ingestedAt,
        trimAfter(e.deviceId, window, fedRules),
      ]
        .map(cell)
        .join('\t') + '\n'
  }
  return Buffer.from(out)
}

/** `COPY ... FROM STDIN` with the whole payload in one go (pg has no COPY of its own). */
function copyFrom(client: pg.ClientBase, text: string, data: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    const q = new pg.Query(text, (err) => {
      if (err) reject(err)
      else resolve()
    }) as pg.Query & { handleCopyInResponse: (c: CopyConnection) => void }
    // pg's Query answers a CopyInResponse with CopyFail; this one sends the data instead.
    q.handleCopyInResponse = (c) => {
      c.sendCopyFromChunk(data)
      c.endCopyFrom()
    }
    client.query(q)
  })
}

interface CopyConnection {
  sendCopyFromChunk(chunk: Buffer): void
  endCopyFrom(): void
}

/**
 * Batch payloads built once and shared by the three connections, dropped when all three have
 * sent them: a million events' payloads never sit in memory at once.
 */
class Payloads {
  readonly #cache = new Map<number, { data: Buffer; uses: number }>()
  readonly #ingestedAt = new Date().toISOString()
  constructor(
    private readonly events: readonly BenchEvent[],
    private readonly batch: number,
    private readonly users: number,
    private readonly window: number,
    private readonly fedRules: number,
  ) {}

  take(from: number): Buffer {
    let hit = this.#cache.get(from)
    if (hit === undefined) {
      const events = this.events.slice(from, from + this.batch)
      hit = {
        data: payload(events, from + 1, this.#ingestedAt, this.window, this.fedRules),
        uses: 0,
      }
      this.#cache.set(from, hit)
    }
    if (++hit.uses === this.users) this.#cache.delete(from)
    return hit.data
  }
}

/**
 * Refuses a workload on which the hand-written alerts SQL would be wrong: it resets every
 * condition, which is right only while no reading breaches a threshold rule of its metric.
 */
export function checkNoBreach(events: readonly BenchEvent[], rules: readonly ThresholdRule[]) {
  for (const { event: e } of events) {
    for (const r of rules) {
      if (r.metric !== e.data.metric) continue
      const breach = r.direction === 'above' ? e.data.value >= r.raiseAt : e.data.value <= r.raiseAt
      if (breach) {
        throw new BenchError(
          `(d) assumes no reading breaches a rule; ${e.deviceId}'s ${e.data.metric} ${e.data.value} breaches '${r.id}'`,
        )
      }
    }
  }
}

/**
 * Writes every event into the migrated database at `url`; three connections at once, `batch`
 * events per transaction.
 */
export async function jobWrite(
  url: string,
  events: readonly BenchEvent[],
  rules: readonly ThresholdRule[],
  batch = JOB_BATCH,
): Promise<JobLimit> {
  checkNoBreach(events, rules)
  const models: JobModel[] = ['readings', 'sensor-status', 'alerts']
  const clients = models.map(() => new pg.Client({ connectionString: url }))
  await Promise.all(clients.map((c) => c.connect()))
  try {
    for (const c of clients) {
      await c.query(`create temp table job_in (${IN_COLUMNS}) on commit delete rows`)
    }
    const payloads = new Payloads(events, batch, models.length, alertWindow(rules), rules.length)
    const start = performance.now()
    const perModel = await Promise.all(
      models.map(async (model, m) => {
        const client = clients[m] as pg.Client
        const sql = statements(model, rules)
        for (let i = 0; i < events.length; i += batch) {
          const data = payloads.take(i)
          const last = events[Math.min(events.length, i + batch) - 1] as BenchEvent
          await client.query('begin')
          await copyFrom(client, 'copy job_in from stdin', data)
          // The checkpoint commits with the rows, as a processor's does.
          await client.query(`${sql}
            insert into processor_checkpoints (processor, stream, last_seq, hlc)
            values ('job-${model}', 'FLEET_EVENTS', ${Math.min(events.length, i + batch)}, ${literal(last.event.hlc)})
            on conflict (processor) do update set last_seq = excluded.last_seq, hlc = excluded.hlc,
              updated_at = now();
            commit;`)
        }
        return (performance.now() - start) / 1000
      }),
    )
    return {
      seconds: (performance.now() - start) / 1000,
      perModel: {
        readings: perModel[0] ?? Number.NaN,
        'sensor-status': perModel[1] ?? Number.NaN,
        alerts: perModel[2] ?? Number.NaN,
      },
      batch,
    }
  } finally {
    await Promise.all(clients.map((c) => c.end().catch(() => undefined)))
  }
}

/** The read-model tables the bench's workload writes, to compare (d) with the processors. */
export const JOB_TABLES = [
  'readings',
  'readings_per_minute',
  'latest_readings',
  'sensor_status',
  'sensor_status_timeline',
  'sensor_status_history',
  'alert_sensors',
  'alert_sensors_timeline',
  'alert_conditions',
  'alert_inputs',
  'alert_tips',
  'alert_horizons',
  'alerts',
  'notification_outbox',
] as const

/** Row count of each of {@link JOB_TABLES}. */
export async function tableRows(pool: pg.Pool): Promise<Record<string, number>> {
  const { rows } = await pool.query<{ t: string; n: string | number }>(
    JOB_TABLES.map((t) => `select '${t}' as t, count(*) as n from ${t}`).join(' union all '),
  )
  return Object.fromEntries(rows.map((r) => [r.t, Number(r.n)]))
}
