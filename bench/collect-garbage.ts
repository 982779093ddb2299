/**
 * Collects the bench process's own garbage before a measured phase, so that V8 does not free it
 * in the middle of one.
 *
 * Why: the events the bench stamps for the limits and the ingest (2 GB at 1M events; 400 MB for
 * the scale-out's 200k) are garbage once ingested, but V8 frees them only at its next full GC,
 * which in a process that mostly waits comes when it pleases: in the latency phase, whose
 * publisher allocates. Freeing hundreds of MB took the bench's GC threads ~0.7 CPU-s at once,
 * beside the processors on the two cores, and stalled its event loop (the publisher and the
 * poller) by up to 133 ms. Measured in a rig (300k events ingested by the process that then
 * publishes at 5,000 ev/s and polls): every run had such a stall ~10 s into the phase, and p99
 * publish -> SQL was 279-410 ms (max 378-518); collected first (60 ms), p99 162 ms, max 207. In
 * the next two 1M runs of the bench, p99 189 and 252 ms (max 228 and 329), against 401 ms (max
 * 480) in the run before.
 */
import { BenchError } from './common.ts'

/**
 * Runs a full GC now, twice: V8 frees what the first found dead on its helper threads after it
 * returns (2 GB of events: ~0.65 CPU-s over the next ~0.6 s, measured), so the phase after it
 * would pay for that; a second GC first finishes that work on this thread. `npm run bench`
 * starts node with `--expose-gc`. Returns the milliseconds both took.
 */
export function collectGarbage(): number {
  const gc = (globalThis as { gc?: () => void }).gc
  if (gc === undefined) {
    throw new BenchError('the bench needs node --expose-gc (npm run bench starts it so)')
  }
  const start = performance.now()
  gc()
  gc()
  return performance.now() - start
}
