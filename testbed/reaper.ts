/**
 * Stops the throwaway servers (and the bench's child processes) when the process that started
 * them ends without cleaning up; see {@link onProcessEnd}.
 */

const tasks = new Set<() => void>()
let installed = false

/**
 * Last-resort cleanup for servers whose `cleanup()` never ran: a test file that forgot it, a fork
 * worker that vitest stops with SIGTERM, a run interrupted with Ctrl+C (vitest then calls
 * `process.exit()`, which fires 'exit'). Tasks must be synchronous: nothing else runs on 'exit'.
 *
 * @example
 * const forget = onProcessEnd(() => process.kill(pid, 'SIGKILL'))
 * // ... on a regular stop:
 * forget()
 */
export function onProcessEnd(task: () => void): () => void {
  install()
  tasks.add(task)
  return () => {
    tasks.delete(task)
  }
}

function runAll(): void {
  for (const task of [...tasks]) {
    tasks.delete(task)
    try {
      task()
    } catch {
      // Best effort: the process is going away and the other tasks must still run.
    }
  }
}

function install(): void {
  if (installed) return
  installed = true
  process.once('exit', runAll)
  for (const signal of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) {
    // Where someone else handles the signal (vitest's main process does), they decide whether
    // the process ends, and 'exit' covers us. Where nobody does (a fork worker), clean up and
    // die of the signal as if we had not been listening.
    if (process.listenerCount(signal) > 0) continue
    process.once(signal, () => {
      runAll()
      if (process.listenerCount(signal) === 0) process.kill(process.pid, signal)
    })
  }
}
