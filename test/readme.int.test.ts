import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Runtime } from '../app/runtime.ts'
import { PROCESSOR_NAMES } from '../processors/processor-registry.ts'
import { simulateFleet } from '../simulator/fleet.ts'
import {
  FAST_FORWARD_TICKS,
  allCaughtUp,
  pipeline,
  repoRoot,
  testPublisher,
  tickDraft,
  type Pipeline,
} from './fixtures.ts'

/** The SQL blocks of the README's "SQL recipes" section, as a reader would copy them. */
async function recipes(): Promise<string[]> {
  const readme = await readFile(join(repoRoot, 'README.md'), 'utf8')
  const section = readme.split('\n## SQL recipes\n')[1]?.split('\n## ')[0] ?? ''
  return [...section.matchAll(/```sql\n([\s\S]*?)```/g)].map((m) => m[1]!.trim())
}

describe('README SQL recipes', () => {
  let p: Pipeline
  let rt: Runtime
  beforeAll(async () => {
    p = await pipeline(FAST_FORWARD_TICKS)
    p.start()
    rt = p.rt
    const publisher = testPublisher(rt, 'sim')
    await simulateFleet(publisher, {
      devices: 30,
      rate: 1000,
      durationSeconds: 2,
      duplicateRatio: 0.05,
      seed: 3,
    })
    for (let i = 0; i < 3; i++) {
      await publisher.publish({
        type: 'reading.recorded',
        deviceId: 'sensor-00002',
        data: { metric: 'temperature', value: 60, unit: 'C' },
      })
    }
    await publisher.publish({
      type: 'sensor.registered',
      deviceId: 'sensor-00001',
      data: {
        site: 'site-001',
        model: 'fs-th-200',
        firmware: '1.5.0',
        inactivityTimeoutSeconds: 3600,
      },
    })
    await publisher.publish(tickDraft(Date.now() + 60_000)) // the rest of the fleet has gone quiet
    await allCaughtUp(rt, PROCESSOR_NAMES)
  })
  afterAll(async () => p.close())

  it('every recipe runs as written and finds what it is about', async () => {
    const all = await recipes()
    expect(all.length).toBeGreaterThanOrEqual(7)
    for (const q of all) {
      const r = await rt.pool.query(q)
      expect(r.rowCount, q).toBeGreaterThan(0)
    }
  })
})
