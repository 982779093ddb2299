/**
 * A throwaway nats-server with JetStream for the tests and the bench: its own temp dir, a random
 * port, a generated config (or the repository's own), and `kill`/`restart` to stage outages.
 * nats.js's test launcher does the same for its own suite.
 */
import { type ChildProcess, spawn } from 'node:child_process'
import { rmSync } from 'node:fs'
import { mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { basename, join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { HarnessError, canConnect, findOnPath, tailFile, within } from './processes.ts'
import { onProcessEnd } from './reaper.ts'

export interface NatsServerOptions {
  /** `server_name` in the config; defaults to `fleetstream-<random>`. */
  serverName?: string
  /** Lines appended verbatim to the generated config (e.g. `max_payload: 1MB`). */
  extraConfig?: string
  /** JetStream store directory; defaults to `<dir>/js`. Not removed by `cleanup()` when given. */
  storeDir?: string
  /**
   * Start from this config file (e.g. the repository's nats.conf) instead of a generated one;
   * `serverName`, `extraConfig` and `storeDir` are then ignored and `args` say the rest. The
   * harness adds only `--ports_file_dir`. `restart()` uses the same file, flags and environment.
   */
  configFile?: string
  /** Command-line flags after `-c <config>`, e.g. `['-a', '127.0.0.1', '-p', '-1']`. */
  args?: readonly string[]
  /**
   * The environment of nats-server (the repository's configs read passwords and addresses from
   * it); only PATH and HOME are inherited.
   */
  env?: Readonly<Record<string, string>>
}

/**
 * A throwaway nats-server with JetStream on a random port of 127.0.0.1.
 *
 * @example
 * const ns = await startNatsServer()
 * const nc = await connect({ servers: ns.url })
 * await ns.kill('SIGKILL') // crash it
 * await ns.restart() // same port, same store: streams survive
 * await ns.cleanup()
 */
export interface NatsServer {
  /** `nats://127.0.0.1:<port>` */
  readonly url: string
  readonly port: number
  /** The temp dir holding the config, the log, the ports file and (by default) the store. */
  readonly dir: string
  /** The pid of the running process; changes on `restart()`. */
  readonly pid: number
  /** SIGTERM, then SIGKILL if it has not exited within 5 s. Does nothing if not running. */
  stop(): Promise<void>
  /** Sends `signal` (default SIGKILL) and waits for the process to exit. */
  kill(signal?: NodeJS.Signals): Promise<void>
  /** Starts again on the same port with the same store dir; stops it first if running. */
  restart(): Promise<void>
  /** `stop()`, then removes `dir`. */
  cleanup(): Promise<void>
}

export const NATS_SERVER_NOT_FOUND =
  "nats-server not found on PATH: install it with 'apt-get install nats-server' (or run 'bash .ci/run')"

const START_TIMEOUT_MS = 10_000
const STOP_GRACE_MS = 5_000
const EXIT_TIMEOUT_MS = 10_000
const POLL_MS = 20

/** Starts a nats-server on a random port in a fresh temp dir; see {@link NatsServer}. */
export async function startNatsServer(opts: NatsServerOptions = {}): Promise<NatsServer> {
  const bin = await findOnPath('nats-server')
  if (bin === undefined) throw new HarnessError(NATS_SERVER_NOT_FOUND)
  const dir = await mkdtemp(join(tmpdir(), 'fleetstream-nats-'))
  const server = new NatsServerImpl(bin, dir, {
    serverName: opts.serverName ?? `fleetstream-${basename(dir).slice(-6)}`,
    storeDir: opts.storeDir ?? join(dir, 'js'),
    extraConfig: opts.extraConfig ?? '',
    configFile: opts.configFile,
    args: opts.args ?? [],
    env: opts.env ?? {},
  })
  try {
    await server.launch(-1)
  } catch (err) {
    await server.cleanup()
    throw err
  }
  return server
}

interface Running {
  readonly child: ChildProcess
  /** Resolves with how the process ended; never rejects. */
  readonly exited: Promise<string>
}

class NatsServerImpl implements NatsServer {
  port = -1
  private running: Running | undefined
  private lastPid = -1
  private readonly confFile: string
  private readonly logFile: string
  private readonly forgetReaper: () => void

  constructor(
    private readonly bin: string,
    readonly dir: string,
    private readonly conf: {
      serverName: string
      storeDir: string
      extraConfig: string
      configFile: string | undefined
      args: readonly string[]
      env: Readonly<Record<string, string>>
    },
  ) {
    this.confFile = conf.configFile ?? join(dir, 'nats-server.conf')
    this.logFile = join(dir, 'nats-server.log')
    this.forgetReaper = onProcessEnd(() => {
      const child = this.running?.child
      if (child !== undefined && isAlive(child)) child.kill('SIGKILL')
      rmSync(dir, { recursive: true, force: true, maxRetries: 3 })
    })
  }

  get url(): string {
    return `nats://127.0.0.1:${this.port}`
  }

  get pid(): number {
    return this.lastPid
  }

  /** Spawns the server on `port` (-1: random) and waits until it accepts connections. */
  async launch(port: number): Promise<void> {
    const args =
      this.conf.configFile === undefined
        ? ['-c', this.confFile]
        : ['-c', this.confFile, '--ports_file_dir', this.dir, ...this.conf.args]
    if (this.conf.configFile === undefined) await writeFile(this.confFile, this.config(port))
    const log = await open(this.logFile, 'a')
    let child: ChildProcess
    try {
      // The log is a file, not a pipe: nothing to drain, and it survives for the error message.
      child = spawn(this.bin, args, {
        cwd: this.dir,
        stdio: ['ignore', log.fd, log.fd],
        env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '/tmp', ...this.conf.env },
      })
    } finally {
      await log.close()
    }
    const exited = new Promise<string>((resolve) => {
      child.once('exit', (code, signal) => {
        resolve(signal ?? `exit code ${String(code)}`)
      })
      child.once('error', (err) => {
        resolve(`spawn error: ${err.message}`)
      })
    })
    this.running = { child, exited }
    this.lastPid = child.pid ?? -1

    const portsFile = join(this.dir, `nats-server_${String(child.pid)}.ports`)
    const deadline = Date.now() + START_TIMEOUT_MS
    let listening = -1
    let ready = false
    while (!ready && isAlive(child) && Date.now() < deadline) {
      if (listening === -1) listening = await readPort(portsFile)
      if (listening !== -1) ready = await canConnect(listening)
      if (!ready) await sleep(POLL_MS)
    }
    if (ready) {
      this.port = listening
      return
    }
    const why = !isAlive(child)
      ? `it exited: ${await exited}`
      : listening === -1
        ? `no ports file ${portsFile} within ${START_TIMEOUT_MS} ms`
        : `127.0.0.1:${listening} refused connections for ${START_TIMEOUT_MS} ms`
    await this.kill('SIGKILL')
    throw new HarnessError(
      `nats-server did not start (${why}); config ${this.confFile}, tail of ${this.logFile}:\n${await tailFile(this.logFile)}`,
    )
  }

  async stop(): Promise<void> {
    const running = this.running
    if (running === undefined || !isAlive(running.child)) return
    running.child.kill('SIGTERM')
    if ((await within(running.exited, STOP_GRACE_MS)) === 'timeout') {
      running.child.kill('SIGKILL')
      await running.exited
    }
  }

  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const running = this.running
    if (running === undefined || !isAlive(running.child)) return
    running.child.kill(signal)
    if ((await within(running.exited, EXIT_TIMEOUT_MS)) === 'timeout') {
      throw new HarnessError(
        `nats-server (pid ${this.pid}) did not exit within ${EXIT_TIMEOUT_MS} ms of ${signal}`,
      )
    }
  }

  async restart(): Promise<void> {
    await this.stop()
    await this.launch(this.port)
  }

  async cleanup(): Promise<void> {
    await this.stop()
    await rm(this.dir, { recursive: true, force: true })
    this.forgetReaper()
  }

  private config(port: number): string {
    return [
      '# written by testbed/nats-server.ts',
      `listen: 127.0.0.1:${port}`,
      `server_name: ${JSON.stringify(this.conf.serverName)}`,
      `jetstream {`,
      `  store_dir: ${JSON.stringify(this.conf.storeDir)}`,
      `}`,
      `ports_file_dir: ${JSON.stringify(this.dir)}`,
      this.conf.extraConfig,
      '',
    ].join('\n')
  }
}

/** The client port from a nats-server ports file, or -1 while it is missing or half written. */
async function readPort(portsFile: string): Promise<number> {
  try {
    const ports = JSON.parse(await readFile(portsFile, 'utf8')) as { nats?: unknown }
    const first: unknown = Array.isArray(ports.nats) ? ports.nats[0] : undefined
    return typeof first === 'string' ? Number(new URL(first).port) : -1
  } catch {
    return -1
  }
}

function isAlive(child: ChildProcess): boolean {
  return child.exitCode === null && child.signalCode === null && child.pid !== undefined
}
