/**
 * How far V8 lets the old generation of a processor process grow past what survived the last full
 * GC before it collects again. By default it picks a factor of up to 4 from how fast it marks
 * compared with how fast the program allocates. The alerts processor keeps ~45 MB live and
 * allocates fast, so V8 picks the top of that range: its heap reached ~200 MB between full GCs
 * and its peak RSS 280-310 MB on a 500k-event catch-up (416 MB in the 1M bench; the goal is 250).
 * The rest of its RSS is ~44 MB of the node binary's pages and 45-85 MB of malloc'd memory
 * (MALLOC_ARENA_MAX=2 did not change that).
 *
 * Measured on the alerts processor (runs side by side on this project's busy 2-core VM, CPU per
 * event): catching up alone on 500k events, default 66-71 us and peak RSS 279-310 MB; 200: +1.5%,
 * 231 MB; 150: +2-4%, 195-213 MB; 100: +10-15%, 192-200 MB. With the three processors on the
 * 1M backlog (the bench's case, stopped at 650-690k alerts events), its live heap grew from ~45 MB
 * to ~75-90 MB past ~600k events, once the other two had caught up, and the peaks were default
 * 419 MB, 150: 299 MB, 100: 238 MB (CPU per event +8% and +17%). Only a factor of 2 met the 250 MB
 * goal there; a smaller live heap would let a larger factor (cheaper in CPU) meet it too.
 *
 * Since then its live heap shrank (its inputs and caches, projections/held-inputs.ts and
 * row-cache.ts), and 150 is the factor. Measured on the 2.6 GHz VM (alerts alone on a 300k-event
 * backlog, 100 and 150 alternated three times): 35.5-38.3 against 33.9-37.8 us of CPU per event,
 * peak RSS 158-162 against 176-179 MB. With the three processors on the 1M backlog, alerts peaked
 * at 195 MB (161 with 100); one process owning all four partitions of a 500k-event stream at
 * 224-236 MB (204 with 100). 200 took that last one to 251 MB.
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
