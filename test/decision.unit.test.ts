import { describe, expect, it } from 'vitest'
import { isOfKind } from '../processors/decision.ts'
import { EVENT_KINDS, type EventKind } from '../schemas/events.ts'
import { eventsFilter, subjectMatches } from '../schemas/subjects.ts'

const SUBJECTS = [
  'fleet.events.sensor-7.reading',
  'fleet.events.2.sensor-7.reading',
  'fleet.events.sensor-7.heartbeat',
  'fleet.events._system.tick',
  'fleet.events.1._system.tick',
  'fleet.events..reading',
  'fleet.events...reading',
  'fleet.events.reading',
  'fleet.events.reading.reading',
  'fleet.events.sensor-7.reading.redrive.readings',
  'fleet.events.sensor-7.xreading',
  'fleet.events.sensor-7.reading.',
  'fleet.eventsx.sensor-7.reading',
  'fleet.event.sensor-7.reading',
  'xfleet.events.sensor-7.reading',
  'fleet.events.a.b.c.reading',
  'fleet.events.sensor-7.',
  'fleet.events.',
  'fleet.events',
  '.reading',
  '',
  'fleet.events.sensor-7.registered',
  'fleet.events.3.sensor-7.status',
  'fleet.events.sensor-7.alert',
]

describe('isOfKind', () => {
  it('says what subjectMatches says of the filter of that kind, partitioned or not', () => {
    const kinds = Object.values(EVENT_KINDS) as EventKind[]
    for (const kind of kinds) {
      for (const partitioned of [false, true]) {
        const filter = eventsFilter(kind, partitioned ? '*' : undefined)
        for (const subject of SUBJECTS) {
          expect(isOfKind(subject, kind, partitioned), `${filter} ${subject}`).toBe(
            subjectMatches(filter, subject),
          )
        }
      }
    }
  })
})
