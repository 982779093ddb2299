import { hostname } from 'node:os'
import * as z from 'zod'
import { HLC_NODE_PATTERN } from '../schemas/hlc.ts'
import { describeIssues, invalidMessage } from '../schemas/validation.ts'
import { OperatorError } from '../schemas/errors.ts'
import { environmentSecrets, redact, redactValue } from './redact.ts'

/** An integer from an environment string; anything else is reported as the string it was. */
const int = (min: number, max: number) =>
  z.preprocess(
    (v) => (typeof v === 'string' && /^\s*-?\d+\s*$/.test(v) ? Number(v) : v),
    z.number().int().min(min).max(max),
  )

/** A TCP port (0: one the OS picks) or `off`; `null` stands for off. */
const portOrOff = z
  .string()
  .trim()
  .regex(/^(off|\d{1,6})$/)
  .transform((v) => (v === 'off' ? null : Number(v)))
  .pipe(z.number().int().min(0).max(65_535).nullable())

/** Environment variables fleetstream reads, with their defaults. */
const Env = z.object({
  NATS_URL: z
    .string()
    .regex(/^(nats|tls|wss?):\/\/\S+$/)
    .default('nats://127.0.0.1:4222'),
  /**
   * NATS user and password (both or neither). Servers started from nats.conf or the cluster
   * configs refuse anonymous clients; each command logs in with the role it needs (README.md,
   * "NATS roles"). Development values are in infra/dev.env.
   */
  NATS_USER: z
    .string()
    .regex(/^[A-Za-z0-9_.-]{1,64}$/)
    .optional(),
  NATS_PASSWORD: z.string().min(1).optional(),
  /**
   * First token of the reply subjects this process subscribes to. The processor and admin
   * roles may only subscribe to their own (`_INBOX_processor`, `_INBOX_admin`), so a device,
   * which may subscribe to `_INBOX.>`, never sees what they receive.
   */
  NATS_INBOX_PREFIX: z
    .string()
    .regex(/^[A-Za-z0-9_-]{1,64}$/)
    .default('_INBOX'),
  DATABASE_URL: z
    .string()
    .regex(/^postgres(ql)?:\/\/\S+$/)
    .default('postgres://postgres@127.0.0.1:5432/fleetstream'),
  /** HLC node id of this process; defaults to a token derived from the host name. */
  FLEETSTREAM_NODE_ID: z.string().regex(HLC_NODE_PATTERN).optional(),
  HLC_MAX_OFFSET_MS: int(0, 3_600_000).default(500),
  /**
   * How far an event's HLC (or a tick's time) may be behind the stream's append time: the longest
   * a device may hold events while offline. 7 days by default; at most 365.
   */
  HLC_MAX_AGE_MS: int(60_000, 365 * 24 * 3_600_000).default(7 * 24 * 3_600_000),
  FLEET_STREAM_REPLICAS: int(1, 5).default(1),
  FLEET_DUPLICATE_WINDOW_SECONDS: int(1, 7 * 24 * 3600).default(120),
  FLEET_MAX_MSG_BYTES: int(1024, 1024 * 1024).default(16 * 1024),
  /** -1: unlimited. With a limit, new events are refused when full; old ones are never dropped. */
  FLEET_STREAM_MAX_BYTES: int(-1, Number.MAX_SAFE_INTEGER).default(-1),
  DLQ_MAX_AGE_DAYS: int(1, 3650).default(30),
  /**
   * Partitions of FLEET_EVENTS by device id: 0 when the server has no partition mapping; N when
   * nats.conf maps `fleet.events.*.*` with `{{partition(N,1)}}` (the two must agree).
   */
  FLEET_PARTITIONS: int(0, 1024).default(0),
  PROCESSOR_BATCH_SIZE: int(1, 10_000).default(1000),
  /**
   * How long a batch's oldest event waits at most for the batch to fill to a quarter of
   * PROCESSOR_BATCH_SIZE; it also waits while the batch before it commits
   * (processors/runner/consumer.ts). It bounds the transactions per second at a steady rate (each
   * costs a few ms of CPU across the processor, Postgres and NATS, whatever its size) and adds at
   * most itself to an event's latency; 0 commits what arrived during the commit before, however
   * few.
   */
  PROCESSOR_BATCH_LINGER_MS: int(0, 10_000).default(100),
  /**
   * Default: three batches, what the pipeline uses (one committing, one prepared, one arriving).
   * More only sits in the buffer, long enough to be promoted into V8's old space: 10,000 raised
   * each processor's peak RSS by 25-95 MB for no CPU per event or throughput (measured, 3000 vs
   * 10,000, three processors at once on a 100k backlog). It is per consumer, so per partition an
   * instance owns: one instance owning 4 partitions peaked 40-50 MB higher than with 1,000 (README,
   * "Scale out by partition").
   */
  PROCESSOR_MAX_ACK_PENDING: int(1, 1_000_000).optional(),
  PROCESSOR_ACK_WAIT_SECONDS: int(1, 3600).default(60),
  /**
   * How long an instance alone after joining leaves the partitions a second instance would own,
   * for one starting beside it to take (processors/runner/runner.ts); 0: takes them all at once.
   */
  PROCESSOR_JOIN_GRACE_MS: int(0, 60_000).default(500),
  /** Seconds between clock ticks published into the stream (stream time for silence). */
  CLOCK_TICK_SECONDS: int(1, 3600).default(10),
  /** Silence after which a sensor without its own timeout becomes unknown. */
  SENSOR_INACTIVITY_TIMEOUT_SECONDS: int(1, 7 * 24 * 3600).default(300),
  /** Alert rules (YAML); defaults to config/alert-rules.yaml in the package. */
  ALERT_RULES_FILE: z.string().min(1).optional(),
  LOG_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  /** `/metrics`, `/healthz` and `/readyz` of `run` and `start`; 0: a port the OS picks; `off`. */
  METRICS_PORT: portOrOff.default(9464),
  /**
   * Address that server listens on. Loopback by default: it has no authentication, so it is
   * exposed (`0.0.0.0`, or one interface's address) only where a scraper's network or a proxy
   * keeps everyone else out, such as inside a container (README.md, "Metrics and health").
   */
  METRICS_HOST: z
    .string()
    .regex(/^[A-Za-z0-9.:-]{1,253}$/)
    .default('127.0.0.1'),
  /**
   * Seconds between reads of the lag figures (NATS and Postgres) that `/metrics` serves from
   * memory: the cost of scraping is one read per interval, whoever scrapes and how often.
   */
  METRICS_REFRESH_SECONDS: int(1, 3600).default(5),
})

/**
 * Every environment variable fleetstream's configuration reads (the OpenTelemetry SDK reads the
 * standard `OTEL_*` variables on its own; see {@link OTEL_VARIABLES} in telemetry.ts).
 */
export const CONFIG_VARIABLES: readonly string[] = Object.freeze(Object.keys(Env.shape))

/**
 * Everything a fleetstream process is configured with, parsed once from the environment.
 *
 * ```ts
 * const config = loadConfig()                       // from process.env
 * const test = loadConfig({ NATS_URL: server.url }) // tests build their own
 * ```
 */
export interface Config {
  readonly natsUrl: string
  /** `undefined`: connect without credentials (an open server, such as the tests' own). */
  readonly natsAuth: { readonly user: string; readonly password: string } | undefined
  readonly natsInboxPrefix: string
  readonly databaseUrl: string
  readonly nodeId: string
  readonly hlcMaxOffsetMs: number
  /** How far behind the stream's append time an HLC or a tick may be (offline buffering). */
  readonly hlcMaxAgeMs: number
  /**
   * Partitions of FLEET_EVENTS (the server's subject mapping); 0: not partitioned. Each processor
   * then has one consumer and one checkpoint per partition, shared out among its instances.
   */
  readonly partitions: number
  readonly streams: {
    readonly events: string
    readonly dlq: string
    readonly notifications: string
    readonly replicas: number
    readonly duplicateWindowSeconds: number
    readonly maxMsgBytes: number
    readonly maxBytes: number
    readonly dlqMaxAgeDays: number
  }
  readonly processor: {
    readonly batchSize: number
    readonly batchLingerMs: number
    readonly maxAckPending: number
    readonly ackWaitSeconds: number
    readonly joinGraceMs: number
  }
  readonly clockTickSeconds: number
  readonly sensorInactivityTimeoutSeconds: number
  /** `undefined`: the rules shipped with the package. */
  readonly alertRulesFile: string | undefined
  readonly logLevel: z.infer<typeof Env>['LOG_LEVEL']
  /** The HTTP server of `run` and `start` (metrics, health, readiness). */
  readonly metrics: {
    /** `null`: no server; 0: a port the OS picks (logged). */
    readonly port: number | null
    /** Loopback unless configured: the endpoints have no authentication. */
    readonly host: string
    /** Seconds between background reads of the lag figures. */
    readonly refreshSeconds: number
  }
}

/** Bad configuration: start-up stops with every problem listed (exit 2). */
export class ConfigError extends OperatorError {
  constructor(
    readonly problems: readonly string[],
    what = 'configuration',
    options?: ErrorOptions,
  ) {
    super(invalidMessage(problems, what), options)
  }
}

export function loadConfig(env: Record<string, string | undefined> = process.env): Config {
  const present = Object.fromEntries(
    Object.entries(env).filter(([, v]) => v !== undefined && v !== ''),
  )
  const parsed = Env.safeParse(present, { reportInput: true })
  if (!parsed.success) {
    // Values are masked before they are described (and cut to length): no secret, not even
    // the start of one, reaches the message.
    const issues = parsed.error.issues.map((issue): z.core.$ZodIssue =>
      typeof issue.input === 'string'
        ? ({
            ...issue,
            input: redactValue(String(issue.path[0] ?? ''), issue.input),
          } as z.core.$ZodIssue)
        : issue,
    )
    const secrets = environmentSecrets(env)
    throw new ConfigError(
      describeIssues(issues).map((line) => redact(line, secrets)),
      'configuration',
    )
  }
  const e = parsed.data
  if ((e.NATS_USER === undefined) !== (e.NATS_PASSWORD === undefined)) {
    const [set, missing] =
      e.NATS_USER === undefined ? ['NATS_PASSWORD', 'NATS_USER'] : ['NATS_USER', 'NATS_PASSWORD']
    throw new ConfigError(
      [`'${missing}' is required when '${set}' is set (give both or neither), got nothing`],
      'configuration',
    )
  }
  const config: Config = {
    natsUrl: e.NATS_URL,
    natsAuth:
      e.NATS_USER !== undefined && e.NATS_PASSWORD !== undefined
        ? { user: e.NATS_USER, password: e.NATS_PASSWORD }
        : undefined,
    natsInboxPrefix: e.NATS_INBOX_PREFIX,
    databaseUrl: e.DATABASE_URL,
    nodeId: e.FLEETSTREAM_NODE_ID ?? defaultNodeId(),
    hlcMaxOffsetMs: e.HLC_MAX_OFFSET_MS,
    hlcMaxAgeMs: e.HLC_MAX_AGE_MS,
    partitions: e.FLEET_PARTITIONS,
    streams: {
      events: 'FLEET_EVENTS',
      dlq: 'FLEET_DLQ',
      notifications: 'FLEET_NOTIFICATIONS',
      replicas: e.FLEET_STREAM_REPLICAS,
      duplicateWindowSeconds: e.FLEET_DUPLICATE_WINDOW_SECONDS,
      maxMsgBytes: e.FLEET_MAX_MSG_BYTES,
      maxBytes: e.FLEET_STREAM_MAX_BYTES,
      dlqMaxAgeDays: e.DLQ_MAX_AGE_DAYS,
    },
    processor: {
      batchSize: e.PROCESSOR_BATCH_SIZE,
      batchLingerMs: e.PROCESSOR_BATCH_LINGER_MS,
      maxAckPending: Math.max(
        e.PROCESSOR_MAX_ACK_PENDING ?? 3 * e.PROCESSOR_BATCH_SIZE,
        e.PROCESSOR_BATCH_SIZE,
      ),
      ackWaitSeconds: e.PROCESSOR_ACK_WAIT_SECONDS,
      joinGraceMs: e.PROCESSOR_JOIN_GRACE_MS,
    },
    clockTickSeconds: e.CLOCK_TICK_SECONDS,
    sensorInactivityTimeoutSeconds: e.SENSOR_INACTIVITY_TIMEOUT_SECONDS,
    alertRulesFile: e.ALERT_RULES_FILE,
    logLevel: e.LOG_LEVEL,
    metrics: {
      port: e.METRICS_PORT,
      host: e.METRICS_HOST,
      refreshSeconds: e.METRICS_REFRESH_SECONDS,
    },
  }
  return deepFreeze(config)
}

function defaultNodeId(): string {
  const token = hostname()
    .toLowerCase()
    .replace(/[^a-z0-9-]+/g, '-')
    .replace(/^-+|-+$/g, '')
  return (token || 'node').slice(0, 64)
}

function deepFreeze<T extends object>(o: T): T {
  for (const v of Object.values(o)) if (typeof v === 'object' && v !== null) deepFreeze(v as object)
  return Object.freeze(o)
}
