/**
 * What starting and watching a throwaway server takes: find its binary, run a command to the end,
 * pick a free port (and pick again when it was taken), check that a port answers, read a log's
 * tail, and {@link HarnessError} for whatever of that fails.
 */
import { execFile } from 'node:child_process'
import { constants } from 'node:fs'
import { access, readFile } from 'node:fs/promises'
import { connect, createServer } from 'node:net'
import { delimiter, join } from 'node:path'

/** A throwaway server could not be found, started, stopped or reached. */
export class HarnessError extends Error {
  override readonly name = 'HarnessError'
}

/** The full path of an executable found on PATH, or undefined. */
export async function findOnPath(name: string): Promise<string | undefined> {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    if (dir === '') continue
    const candidate = join(dir, name)
    if (await isExecutable(candidate)) return candidate
  }
  return undefined
}

export async function isExecutable(path: string): Promise<boolean> {
  try {
    await access(path, constants.X_OK)
    return true
  } catch {
    return false
  }
}

/** The last `lines` lines of a log file, or a note saying why there are none. */
export async function tailFile(path: string, lines = 40): Promise<string> {
  let text: string
  try {
    text = await readFile(path, 'utf8')
  } catch (err) {
    return `(no log: ${(err as Error).message})`
  }
  const all = text.trimEnd().split('\n')
  return all.length === 1 && all[0] === '' ? '(log is empty)' : all.slice(-lines).join('\n')
}

export interface RunResult {
  readonly code: number
  readonly output: string
}

/** Runs a command to completion; never rejects on a non-zero exit, the caller decides. */
export function run(
  file: string,
  args: readonly string[],
  opts: { cwd: string; timeoutMs: number },
): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(
      file,
      args,
      { cwd: opts.cwd, timeout: opts.timeoutMs, killSignal: 'SIGKILL', encoding: 'utf8' },
      (err, stdout, stderr) => {
        const output = `${stdout}${stderr}`.trimEnd()
        if (err === null) {
          resolve({ code: 0, output })
          return
        }
        // A spawn failure carries a string code (ENOENT), a timeout a null code and a signal.
        const code = typeof err.code === 'number' ? err.code : -1
        const why = err.killed ? `killed after ${opts.timeoutMs} ms` : err.message
        resolve({ code, output: code === -1 ? `${output}\n${why}`.trim() : output })
      },
    )
  })
}

/** Whether something accepts TCP connections on 127.0.0.1:port. */
export function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect({ host: '127.0.0.1', port })
    socket.once('connect', () => {
      socket.destroy()
      resolve(true)
    })
    socket.once('error', () => {
      socket.destroy()
      resolve(false)
    })
  })
}

/** A TCP port that was free a moment ago on 127.0.0.1 (the OS picks it). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const address = server.address()
      server.close(() => {
        if (address !== null && typeof address === 'object') resolve(address.port)
        else reject(new HarnessError(`could not read a free port from ${String(address)}`))
      })
    })
  })
}

/**
 * Starts a server on ports picked by {@link freePort}, again on fresh ones when it could not bind
 * one: a port is free when picked, and another process can take it before the server binds it
 * (any outgoing connection takes an ephemeral port from the range the OS picks free ports from).
 * `start` picks its ports itself, and fails with the server's "address already in use" in its
 * error (nats-server's log and Postgres' say so in these words) when one was taken.
 */
export async function onFreePorts<T>(start: () => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await start()
    } catch (err) {
      if (attempt >= FREE_PORT_ATTEMPTS || !/address already in use/i.test(String(err))) throw err
    }
  }
}

/** Starts on fresh ports at most this many times (see {@link onFreePorts}). */
const FREE_PORT_ATTEMPTS = 3

/** Resolves with the promise's value, or with 'timeout' after `ms`; the timer never outlives it. */
export async function within<T>(promise: Promise<T>, ms: number): Promise<T | 'timeout'> {
  let timer: NodeJS.Timeout | undefined
  const timeout = new Promise<'timeout'>((resolve) => {
    timer = setTimeout(resolve, ms, 'timeout')
  })
  try {
    return await Promise.race([promise, timeout])
  } finally {
    clearTimeout(timer)
  }
}
