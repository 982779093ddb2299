import { AsyncLocalStorageContextManager } from '@opentelemetry/context-async-hooks'
import { W3CTraceContextPropagator } from '@opentelemetry/core'
import { context, propagation, trace, TraceFlags } from '@opentelemetry/api'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { Runtime } from '../app/runtime.ts'
import { ValidationError } from '../schemas/validation.ts'
import { freshDatabase, startNatsServer, type NatsServer } from './harness/test-servers.ts'
import { readingDraft, testConfig, testPublisher, testRuntime } from './fixtures.ts'

describe('publisher', () => {
  let nats: NatsServer
  let rt: Runtime
  beforeAll(async () => {
    nats = await startNatsServer()
    rt = await testRuntime(testConfig(nats.url, await freshDatabase()))
  })
  afterAll(async () => {
    await rt.close()
    await nats.cleanup()
  })

  it('stores the event under its subject with Nats-Msg-Id, HLC and correlation headers, as `nats stream view` shows them', async () => {
    const publisher = testPublisher(rt, 'gw-7')
    const { event, seq, duplicate } = await publisher.publish(readingDraft('sensor-9', 3.5))
    expect(duplicate).toBe(false)
    const m = await rt.jsm.streams.getMessage('FLEET_EVENTS', { seq })
    expect(m?.subject).toBe('fleet.events.sensor-9.reading')
    expect(m?.json()).toEqual(event)
    expect(Object.fromEntries([...m!.header.keys()].map((k) => [k, m!.header.get(k)]))).toEqual({
      'Nats-Msg-Id': event.eventId,
      'Fleet-Hlc': event.hlc,
      'Fleet-Correlation-Id': event.eventId,
      'Fleet-Event-Type': 'reading.recorded',
    })
    expect(event.hlc).toMatch(/^\d{13}-\d{6}-gw-7$/)
  })

  it('carries correlation, causation and HLC order from the event that caused it', async () => {
    const publisher = testPublisher(rt, 'gw-7')
    const cause = await publisher.publish(readingDraft('sensor-9', 1))
    const effect = await testPublisher(rt, 'svc-2').publish({
      type: 'status.changed',
      deviceId: 'sensor-9',
      data: { status: 'maintenance' },
      causedBy: cause.event,
    })
    expect(effect.event.correlationId).toBe(cause.event.correlationId)
    expect(effect.event.causationId).toBe(cause.event.eventId)
    expect(effect.event.hlc > cause.event.hlc).toBe(true)
    const m = await rt.jsm.streams.getMessage('FLEET_EVENTS', { seq: effect.seq })
    expect(m?.header.get('Fleet-Causation-Id')).toBe(cause.event.eventId)
  })

  it('adds W3C traceparent when a span is active', async () => {
    context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable())
    propagation.setGlobalPropagator(new W3CTraceContextPropagator())
    try {
      const span = {
        traceId: '4bf92f3577b34da6a3ce929d0e0e4736',
        spanId: '00f067aa0ba902b7',
        traceFlags: TraceFlags.SAMPLED,
      }
      const publisher = testPublisher(rt)
      const { seq } = await context.with(trace.setSpanContext(context.active(), span), () =>
        publisher.publish(readingDraft('sensor-9', 2)),
      )
      const m = await rt.jsm.streams.getMessage('FLEET_EVENTS', { seq })
      expect(m?.header.get('traceparent')).toBe(
        '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01',
      )
    } finally {
      propagation.disable()
      context.disable()
    }
  })

  it('refuses an invalid event before it reaches the stream, naming field, rule and value', async () => {
    const publisher = testPublisher(rt)
    const before = (await rt.jsm.streams.info('FLEET_EVENTS')).state.messages
    const err = await publisher
      .publish(readingDraft('Sensor 7', Number.NaN))
      .catch((e: unknown) => e)
    expect(err).toBeInstanceOf(ValidationError)
    expect((err as ValidationError).problems).toEqual([
      "'deviceId' must match /^[a-z0-9-]{1,64}$/, got 'Sensor 7'",
      "'data.value' must be a finite number, got NaN",
    ])
    expect((await rt.jsm.streams.info('FLEET_EVENTS')).state.messages).toBe(before)
    expect(publisher.stats.failed).toBe(1)
  })
})
