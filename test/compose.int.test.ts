import { spawnSync } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { dirname, join, posix, resolve } from 'node:path'
import { describe, expect, it } from 'vitest'
import { parse } from 'yaml'
import { CONFIG_VARIABLES, loadConfig } from '../infra/config.ts'
import { OTEL_VARIABLES } from '../infra/telemetry.ts'
import { PROCESSOR_NAMES } from '../processors/processor-registry.ts'
import {
  clusterNodeEnv,
  CLUSTER_NODES,
  freshDatabase,
  generateSecrets,
  HarnessError,
  repoRoot,
  startRoleNatsServer,
  type NodePorts,
} from './harness/test-servers.ts'
import { findOnPath, run } from '../testbed/processes.ts'
import { cliPath, runCli, testEnv } from './fixtures.ts'

/**
 * infra/docker-compose.yml, checked without a Docker engine: what it mounts exists, what it
 * starts is what the tests start (the same NATS config and environment names, real fleetstream
 * commands and variables), and its start-up graph is sane.
 */
const COMPOSE_FILE = join(repoRoot, 'infra/docker-compose.yml')
const composeDir = dirname(COMPOSE_FILE)

interface Service {
  image?: string
  build?: { context: string; dockerfile?: string }
  entrypoint?: string[]
  command?: string[]
  /** YAML may give numbers and booleans; compose passes them on as strings. */
  environment?: Record<string, string | number | boolean>
  volumes?: string[]
  ports?: string[]
  depends_on?: Record<string, { condition: string }>
  healthcheck?: { test: string[] }
  restart?: string
  container_name?: string
}

/** Compose's variable interpolation with an empty environment: `${X:-default}` gives the default. */
function interpolate(value: string, env: Record<string, string> = {}): string {
  return value.replace(
    /\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)/g,
    (m, braced?: string, dflt?: string, bare?: string) => {
      if (m === '$$') return '$'
      const name = braced ?? bare ?? ''
      return env[name] ?? dflt ?? ''
    },
  )
}

const compose = parse(readFileSync(COMPOSE_FILE, 'utf8'), { merge: true }) as {
  services: Record<string, Service>
  volumes?: Record<string, unknown>
}
const services = compose.services
const envOf = (s: Service): Record<string, string> =>
  Object.fromEntries(
    Object.entries(s.environment ?? {}).map(([k, v]) => [k, interpolate(String(v))]),
  )
const NATS_NODES = [...CLUSTER_NODES]
const APP_SERVICES = ['setup', ...PROCESSOR_NAMES, 'simulator']

/** A path inside a container, resolved through the service's bind mounts to a repository file. */
function hostPath(s: Service, containerPath: string): string | undefined {
  for (const v of s.volumes ?? []) {
    const [source = '', target = ''] = v.split(':')
    if (!source.startsWith('.') && !source.startsWith('/')) continue
    if (containerPath === target || containerPath.startsWith(`${target}/`)) {
      return join(resolve(composeDir, source), posix.relative(target, containerPath))
    }
  }
  return undefined
}

/** Every `$VAR` a nats-server config and its includes read from the environment. */
function configVariables(file: string): Set<string> {
  // One text with every include in it: a variable may be defined in one file, used in another.
  const text = configText(file)
  const defined = new Set([...text.matchAll(/^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=/gm)].map((m) => m[1]))
  const vars = new Set<string>()
  // Quoted strings are taken literally ("$JS.API.INFO" is a subject, not a variable).
  for (const m of text.replace(/"[^"]*"/g, '""').matchAll(/\$([A-Za-z_][A-Za-z0-9_]*)/g)) {
    if (!defined.has(m[1])) vars.add(m[1]!)
  }
  return vars
}

function configText(file: string): string {
  const text = readFileSync(file, 'utf8').replace(/#.*$/gm, '')
  return text.replace(/^\s*include\s+"?([^"\s]+)"?/gm, (_l, inc: string) =>
    configText(join(dirname(file), inc)),
  )
}

describe('infra/docker-compose.yml', () => {
  it('has the services the deployment needs', () => {
    expect(Object.keys(services).sort()).toEqual(
      [...NATS_NODES, 'postgres', 'jaeger', ...APP_SERVICES].sort(),
    )
  })

  it('mounts only files that exist and volumes it declares', () => {
    for (const [name, s] of Object.entries(services)) {
      for (const v of s.volumes ?? []) {
        const source = v.split(':')[0]!
        if (source.startsWith('.') || source.startsWith('/')) {
          expect(existsSync(resolve(composeDir, source)), `${name}: mount source ${source}`).toBe(
            true,
          )
        } else {
          expect(Object.keys(compose.volumes ?? {}), `${name}: volume ${source}`).toContain(source)
        }
      }
    }
  })

  it('starts each NATS node as the tests do, from a config that passes nats-server -t', async () => {
    const bin = await findOnPath('nats-server')
    if (bin === undefined) throw new HarnessError('nats-server not found on PATH')
    // The variable names the loopback cluster of the tests sets for each node.
    const ports: NodePorts[] = NATS_NODES.map(() => ({ client: 1, http: 2, cluster: 3, mqtt: 4 }))
    const harnessNames = Object.keys(clusterNodeEnv(0, ports, generateSecrets())).sort()
    for (const node of NATS_NODES) {
      const s = services[node]!
      const env = envOf(s)
      expect([...(s.entrypoint ?? []), ...(s.command ?? [])].slice(0, 2), node).toEqual([
        'nats-server',
        '-c',
      ])
      expect(s.command?.length, `${node}: nothing but -c <config>`).toBe(2)
      const conf = hostPath(s, s.command![1]!)
      expect(conf, `${node}: ${s.command![1]!} is not mounted from the repository`).toBeDefined()
      expect(conf).toBe(join(repoRoot, 'infra/nats/cluster-node.conf'))
      expect(Object.keys(env).sort(), `${node}: environment names`).toEqual(harnessNames)
      expect(
        [...configVariables(conf!)].filter((v) => !(v in env)),
        node,
      ).toEqual([])
      expect(env.NATS_SERVER_NAME).toBe(node)
      // Routes to every node, on the port each listens on for routes.
      const routePort = env.NATS_CLUSTER_LISTEN!.split(':')[1]
      expect([env.NATS_ROUTE_1, env.NATS_ROUTE_2, env.NATS_ROUTE_3]).toEqual(
        NATS_NODES.map((n) => `nats-route://route:${env.NATS_ROUTE_PASSWORD!}@${n}:${routePort!}`),
      )
      // The health check asks the monitoring port the node listens on.
      const httpPort = env.NATS_HTTP!.split(':')[1]!
      expect(s.healthcheck?.test.join(' ')).toContain(`127.0.0.1:${httpPort}/healthz`)
      // With this node's environment and nothing else.
      const r = spawnSync(bin, ['-t', '-c', conf!], {
        cwd: repoRoot,
        env: { PATH: process.env.PATH ?? '', ...env },
        encoding: 'utf8',
        timeout: 10_000,
      })
      expect(r.status, `${node}: nats-server -t: ${r.stdout}${r.stderr}`).toBe(0)
    }
  })

  it('builds the application from a Dockerfile whose sources exist', () => {
    for (const name of APP_SERVICES) {
      const s = services[name]!
      expect(s.build?.context, name).toBe('..')
      expect(s.image, name).toBe('fleetstream:local')
    }
    const context = resolve(composeDir, services.setup!.build!.context)
    const dockerfile = readFileSync(
      join(context, services.setup!.build!.dockerfile ?? 'Dockerfile'),
      'utf8',
    )
    const copies = dockerfile.split('\n').filter((l) => /^COPY\s/.test(l) && !l.includes('--from'))
    expect(copies.length).toBeGreaterThan(0)
    for (const line of copies) {
      const sources = line.trim().split(/\s+/).slice(1, -1)
      for (const src of sources)
        expect(existsSync(join(context, src)), `Dockerfile: ${line}`).toBe(true)
    }
    const entrypoint = dockerfile.match(/^ENTRYPOINT\s+(\[.*\])\s*$/m)?.[1]
    expect(JSON.parse(entrypoint ?? '[]')).toEqual([
      'node',
      '--max-semi-space-size=4',
      'dist/cli/fleetstream.js',
    ])
  })

  it('runs real fleetstream commands with the role each needs', async () => {
    const roles = generateSecrets().roles
    const nodeEnv = envOf(services.n1!)
    const roleOf: Record<string, 'admin' | 'processor' | 'gateway'> = {
      setup: 'admin',
      run: 'processor',
      simulate: 'gateway',
    }
    for (const name of APP_SERVICES) {
      const s = services[name]!
      const command = s.command ?? []
      const help = await run(process.execPath, [cliPath, ...command, '--help'], {
        cwd: repoRoot,
        timeoutMs: 30_000,
      })
      expect(help.code, `${name}: fleetstream ${command.join(' ')} --help: ${help.output}`).toBe(0)
      if (command[0] === 'run') {
        // One processor per service, named after it, so each scales on its own.
        expect(command.slice(1), name).toEqual([name])
        expect(PROCESSOR_NAMES).toContain(name)
        expect(s.container_name, `${name} must be scalable`).toBeUndefined()
        expect(s.ports, `${name} must be scalable`).toBeUndefined()
      }
      const env = envOf(s)
      const role = roleOf[command[0]!]
      expect(role, `${name}: a role for '${command[0]!}'`).toBeDefined()
      expect(env.NATS_USER, name).toBe(role)
      // The password the nodes give that user.
      expect(env.NATS_PASSWORD, name).toBe(nodeEnv[`NATS_${role!.toUpperCase()}_PASSWORD`])
      expect(env.NATS_INBOX_PREFIX ?? '_INBOX', name).toBe(roles[role!].inboxPrefix)
    }
  })

  it('sets only variables fleetstream reads, pointing at the services that exist', () => {
    const known = new Set([...CONFIG_VARIABLES, ...OTEL_VARIABLES])
    const nodeEnv = envOf(services.n1!)
    const clientPort = nodeEnv.NATS_LISTEN!.split(':')[1]!
    const pgEnv = envOf(services.postgres!)
    for (const name of APP_SERVICES) {
      const env = envOf(services[name]!)
      expect(
        Object.keys(env).filter((k) => !known.has(k)),
        name,
      ).toEqual([])
      expect(env.NATS_URL, name).toBe(NATS_NODES.map((n) => `nats://${n}:${clientPort}`).join(','))
      expect(env.DATABASE_URL, name).toBe(
        `postgres://postgres:${pgEnv.POSTGRES_PASSWORD!}@postgres:5432/${pgEnv.POSTGRES_DB!}`,
      )
      // The streams are R3 on the cluster, and every process checks them against the same spec.
      expect(env.FLEET_STREAM_REPLICAS, name).toBe('3')
      expect(env.OTEL_EXPORTER_OTLP_ENDPOINT, name).toBe('http://jaeger:4318')
      expect(env.OTEL_SERVICE_NAME, name).toMatch(/^fleetstream-/)
    }
    // Jaeger v2 receives OTLP (4317 gRPC, 4318 HTTP) out of the box; v1's switch is gone.
    const jaeger = services.jaeger!
    expect(jaeger.environment?.COLLECTOR_OTLP_ENABLED).toBeUndefined()
    expect(jaeger.ports).toEqual(expect.arrayContaining(['16686:16686', '4318:4318']))
  })

  it('runs current images, the ones the README names', () => {
    const readme = readFileSync(join(repoRoot, 'README.md'), 'utf8')
    const section = readme.slice(readme.indexOf('## docker compose'))
    const composeSection = section.slice(0, section.indexOf('\n## ', 3))
    const images = Object.values(services)
      .map((s) => s.image)
      .filter((i): i is string => i !== undefined && i !== 'fleetstream:local')
    for (const image of new Set(images))
      expect(composeSection, `README's docker compose section names ${image}`).toContain(image)
    // Jaeger v2 (v1 is end of life) and a nats-server the NATS project still supports.
    expect(services.jaeger!.image).toMatch(/(^|\/)jaegertracing\/jaeger:2\.\d+\.\d+$/)
    for (const node of NATS_NODES) {
      const minor = Number(/^nats:2\.(\d+)/.exec(services[node]!.image ?? '')?.[1] ?? 0)
      expect(minor, `${node}: ${services[node]!.image ?? ''}`).toBeGreaterThanOrEqual(12)
    }
    // The Dockerfile runs on a Node LTS line that is not end of life (even major, 22 or later),
    // and the README says which.
    const dockerfile = readFileSync(join(repoRoot, 'Dockerfile'), 'utf8')
    const bases = [...dockerfile.matchAll(/^FROM\s+(node:(\d+)\S*)/gm)]
    expect(bases.length).toBeGreaterThan(0)
    for (const [, image, major] of bases) {
      expect(Number(major) % 2, image).toBe(0)
      expect(Number(major), image).toBeGreaterThanOrEqual(22)
      expect(composeSection, `README's docker compose section names ${image!}`).toContain(image)
    }
  })

  it('serves metrics and health where the health check and a scraper can reach them', () => {
    for (const name of APP_SERVICES) {
      const s = services[name]!
      if (!['run', 'start'].includes(s.command?.[0] ?? '')) continue
      // Inside a container a loopback listener is out of reach of the compose network.
      const { metrics } = loadConfig(envOf(s))
      expect(metrics.host, name).not.toMatch(/^(127\.|::1$|localhost$)/)
      expect(metrics.port, name).not.toBeNull()
      // Liveness, not readiness: a scaled standby is alive and not ready, and must not be
      // unhealthy for it (restarting it would not make it ready either).
      expect(s.healthcheck?.test.join(' '), name).toContain(`:${metrics.port}/healthz`)
      expect(s.healthcheck?.test.join(' '), name).not.toContain('/readyz')
      // Not published on the host: it has no authentication.
      expect(s.ports, name).toBeUndefined()
    }
  })

  it('has a sane start-up graph: no cycles, health checks where waited for', () => {
    const deps = (n: string) => Object.entries(services[n]?.depends_on ?? {})
    for (const name of Object.keys(services)) {
      for (const [dep, { condition }] of deps(name)) {
        expect(Object.keys(services), `${name} depends on ${dep}`).toContain(dep)
        if (condition === 'service_healthy')
          expect(services[dep]!.healthcheck, `${name} waits for ${dep} to be healthy`).toBeDefined()
        if (condition === 'service_completed_successfully')
          expect(services[dep]!.restart ?? 'no', `${name} waits for ${dep} to finish`).toMatch(
            /^(no|on-failure)$/,
          )
      }
    }
    const visiting = new Set<string>()
    const done = new Set<string>()
    const visit = (n: string, path: string[]): void => {
      if (done.has(n)) return
      expect(visiting.has(n), `cycle: ${[...path, n].join(' -> ')}`).toBe(false)
      visiting.add(n)
      for (const [d] of deps(n)) visit(d, [...path, n])
      visiting.delete(n)
      done.add(n)
    }
    for (const n of Object.keys(services)) visit(n, [])
    // Long-running services report their health (Jaeger only receives traces: nothing waits on it).
    for (const [name, s] of Object.entries(services)) {
      if (name !== 'jaeger' && s.restart === 'unless-stopped')
        expect(s.healthcheck, `${name} has a health check`).toBeDefined()
    }
    // Processors wait for their dependencies themselves: none waits for set-up or health.
    for (const p of PROCESSOR_NAMES) {
      expect(
        deps(p).filter(([, c]) => c.condition !== 'service_started'),
        p,
      ).toEqual([])
    }
  })

  it('starts its simulator as the gateway without an error in its log', async () => {
    const ns = await startRoleNatsServer()
    try {
      const env = testEnv(ns.url, await freshDatabase())
      const setup = await runCli(['setup'], { ...env, ...ns.env('admin') })
      expect(setup.code, setup.output).toBe(0)
      // The compose service's command, for a second.
      const command = [...services.simulator!.command!]
      command[command.indexOf('--duration') + 1] = '1'
      const sim = await runCli(command, { ...env, ...ns.env('gateway'), LOG_LEVEL: 'debug' })
      expect(sim.code, sim.output).toBe(0)
      expect(sim.output).toMatch(/^sent \d/m)
      // pino's error (50) and fatal (60) levels: nothing went wrong, so nothing says so.
      const errors = sim.output.split('\n').filter((l) => /"level":(50|60)\b/.test(l))
      expect(errors, sim.output).toEqual([])
    } finally {
      await ns.cleanup()
    }
  })
})
