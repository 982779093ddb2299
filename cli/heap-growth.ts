/**
 * How far V8 lets the old generation of a processor process grow past what survived the last full
 * GC before it collects again. By default it picks a factor of up to 4 from how fast it marks
 * compared with how fast the program allocates. The alerts processor keeps ~45 MB live and
 * allocates fast, so V8 picks the top of that range: its heap reached ~200 MB between full GCs
 * and its peak RSS 280-310 MB on a 500k-event catch-up (416 MB in the 1M bench; the goal is 250).
 * The rest of its RSS is ~44 MB of the node binary's pages and 45-85 MB of malloc'd memory
 * (MALLOC_ARENA_MAX=2 did not change that).
 *
 * Measured on the alerts processor catching up on 500k events (runs side by side, CPU per event):
 * default 66-71 us, peak RSS 279-310 MB; factor 3 (200) +1.5%, 231 MB; 2.5 (150) +2-4%,
 * 195-213 MB; 2 (100) +10-15%, 192-200 MB. 2.5 it is.
 *
 * Unlike the semi-space size, this flag is read at every full GC, so it can be set at run time:
 * only a process that runs the alerts processor pays for it (sensor-status and readings stay under
 * the goal without it). A `--heap-growing-percent` given on the command line or in NODE_OPTIONS
 * wins.
 */
import { setFlagsFromString } from 'node:v8'

/** The old generation grows to at most (1 + this / 100) x what survived the last full GC. */
export const ALERTS_HEAP_GROWING_PERCENT = 150

/** Caps the heap growing factor, unless the operator set one. */
export function capHeapGrowth(percent: number): void {
  const given = [...process.execArgv, ...(process.env.NODE_OPTIONS ?? '').split(/\s+/)]
  if (given.some((a) => a.startsWith('--heap-growing-percent'))) return
  setFlagsFromString(`--heap-growing-percent=${percent}`)
}
