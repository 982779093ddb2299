/**
 * The HTTP side of a long-running process: `/metrics` (prom-client's registry as text), `/healthz`
 * and `/readyz`. prom-client (15.x) has registries and a Pushgateway client but no server of its
 * own; its README serves `registry.metrics()` from an express app (example/server.js). Three GET
 * routes do not need a framework: `node:http` is a dependency fewer, and this file also decides
 * what a busy port means (bad configuration) and that no keep-alive connection holds the process
 * up on exit.
 */
import { once } from 'node:events'
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import type { Registry } from 'prom-client'
import { ConfigError } from './config.ts'
import type { Logger } from './logger.ts'
import { errorSummary } from './retry.ts'

/** One readiness check: passed, or why not. */
export interface CheckResult {
  readonly ok: boolean
  /** Why it failed, or what it saw. */
  readonly detail?: unknown
}

/** What `/readyz` answers: 200 when every check passed, 503 with the failed ones otherwise. */
export interface Readiness {
  readonly ready: boolean
  readonly checks: Readonly<Record<string, CheckResult>>
}

/**
 * The HTTP endpoints of a long-running fleetstream process:
 *
 * - `GET /metrics`: Prometheus text format from `registry`
 * - `GET /healthz`: 200 while the process is alive and its event loop answers
 * - `GET /readyz`: 200 when `ready()` says so, else 503; the body (JSON) names the failed checks
 *
 * ```ts
 * const server = await startMetricsServer({ port: 0, host: '127.0.0.1', registry, ready, log })
 * log.info({ url: server.url }, 'metrics and health')
 * await server.close()
 * ```
 */
export interface MetricsServer {
  readonly port: number
  /** `http://<host>:<port>` */
  readonly url: string
  close(): Promise<void>
}

export interface MetricsServerOptions {
  /** 0: a port the OS picks. */
  readonly port: number
  readonly host: string
  readonly registry: Registry
  readonly ready: () => Promise<Readiness>
  readonly log: Logger
}

/** Binds the server; a port that cannot be bound stops start-up as bad configuration. */
export async function startMetricsServer(opts: MetricsServerOptions): Promise<MetricsServer> {
  const started = Date.now()
  const server = createServer((req, res) => {
    handle(req, res, opts, started).catch((err: unknown) => {
      opts.log.warn({ err: errorSummary(err), path: req.url }, 'metrics server request failed')
      if (!res.headersSent) send(res, 500, 'text/plain; charset=utf-8', `${errorSummary(err)}\n`)
      else res.destroy()
    })
  })
  // Probes and scrapers open a connection per request; none may keep the process up on exit.
  server.keepAliveTimeout = 5_000
  server.requestTimeout = 15_000
  try {
    server.listen(opts.port, opts.host)
    await once(server, 'listening')
  } catch (err) {
    const code = (err as { code?: unknown }).code
    throw new ConfigError(
      [
        `'METRICS_PORT' ${opts.port} on '${opts.host}' cannot be bound (${typeof code === 'string' ? code : errorSummary(err)}): ` +
          `give each process its own port, 0 for one the OS picks, or 'off'`,
      ],
      'configuration',
      { cause: err },
    )
  }
  server.on('error', (err) => {
    opts.log.warn({ err: errorSummary(err) }, 'metrics server error')
  })
  const { port } = server.address() as AddressInfo
  const host = opts.host.includes(':') ? `[${opts.host}]` : opts.host
  return {
    port,
    url: `http://${host}:${port}`,
    async close() {
      const closed = once(server, 'close')
      server.close()
      server.closeAllConnections()
      await closed
    },
  }
}

async function handle(
  req: IncomingMessage,
  res: ServerResponse,
  opts: MetricsServerOptions,
  started: number,
): Promise<void> {
  const path = new URL(req.url ?? '/', 'http://localhost').pathname
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    res.setHeader('Allow', 'GET, HEAD')
    send(res, 405, 'text/plain; charset=utf-8', `method ${req.method ?? '?'} not allowed\n`)
    return
  }
  switch (path) {
    case '/metrics':
      send(res, 200, opts.registry.contentType, await opts.registry.metrics())
      return
    case '/healthz':
      // Answering at all is the check: a wedged event loop answers nothing, and the probe's
      // timeout sees that. Dependencies are /readyz's business: a process waiting for Postgres
      // is alive and must not be restarted for it.
      sendJson(res, 200, {
        status: 'alive',
        pid: process.pid,
        uptimeSeconds: Math.round((Date.now() - started) / 1000),
      })
      return
    case '/readyz': {
      const r = await opts.ready()
      const failed = Object.entries(r.checks)
        .filter(([, c]) => !c.ok)
        .map(([name]) => name)
      sendJson(res, r.ready ? 200 : 503, {
        status: r.ready ? 'ready' : 'not ready',
        ...(failed.length > 0 ? { failed } : {}),
        checks: r.checks,
      })
      return
    }
    default:
      send(
        res,
        404,
        'text/plain; charset=utf-8',
        `no such path '${path}': try /metrics, /healthz or /readyz\n`,
      )
  }
}

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  send(res, status, 'application/json', `${JSON.stringify(body)}\n`)
}

function send(res: ServerResponse, status: number, contentType: string, body: string): void {
  res.writeHead(status, {
    'Content-Type': contentType,
    'Content-Length': Buffer.byteLength(body),
    'Cache-Control': 'no-store',
  })
  res.end(res.req.method === 'HEAD' ? undefined : body)
}
