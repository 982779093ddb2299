import { readFile } from 'node:fs/promises'
import { createServer, type Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import { headers } from '@nats-io/transport-node'
import { context, propagation, SpanKind, trace } from '@opentelemetry/api'
import { tracing } from '@opentelemetry/sdk-node'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { startTelemetry, type Telemetry } from '../infra/telemetry.ts'
import { PROCESSOR_NAMES } from '../processors/processor-registry.ts'
import { freshDatabase, startNatsServer, type NatsServer } from './harness/test-servers.ts'
import {
  allCaughtUp,
  natsAdmin,
  pipeline,
  readingDraft,
  rulesFile,
  runCli,
  spawnCli,
  testEnv,
  testPublisher,
  waitFor,
  type Pipeline,
} from './fixtures.ts'

describe('traces, in this process with an in-memory exporter', () => {
  const exporter = new tracing.InMemorySpanExporter()
  let telemetry: Telemetry
  let p: Pipeline
  beforeAll(async () => {
    telemetry = await startTelemetry({
      serviceName: 'fleetstream-test',
      spanProcessors: [new tracing.SimpleSpanProcessor(exporter)],
    })
    p = await pipeline()
  })
  afterAll(async () => {
    await p.close()
    await telemetry.shutdown()
    trace.disable()
    propagation.disable()
    context.disable()
  })

  it('a producer span per event, continued by every processor: child spans and batch links', async () => {
    const publisher = testPublisher(p.rt)
    const published = []
    for (let i = 0; i < 5; i++) published.push(await publisher.publish(readingDraft('sensor-1', i)))
    p.start()
    await allCaughtUp(p.rt, PROCESSOR_NAMES)
    await p.stop()

    const spans = exporter.getFinishedSpans()
    for (const { event, seq } of published) {
      const producer = spans.find(
        (s) =>
          s.kind === SpanKind.PRODUCER && s.attributes['messaging.message.id'] === event.eventId,
      )
      expect(producer, `producer span of ${event.eventId}`).toBeDefined()
      expect(producer!.name).toBe('publish reading.recorded')
      expect(producer!.attributes).toMatchObject({
        'messaging.system': 'nats',
        'messaging.destination.name': 'fleet.events.sensor-1.reading',
        'fleetstream.stream.sequence': seq,
        'fleetstream.correlation.id': event.correlationId,
        'fleetstream.hlc': event.hlc,
      })

      // One consumer span per processor, in the event's own trace, child of the producer span.
      const consumed = spans.filter(
        (s) =>
          s.kind === SpanKind.CONSUMER &&
          s.attributes['messaging.message.id'] === event.eventId &&
          s.attributes['messaging.batch.message_count'] === undefined,
      )
      expect(consumed.map((s) => s.attributes['fleetstream.processor']).sort()).toEqual(
        [...PROCESSOR_NAMES].sort(),
      )
      for (const c of consumed) {
        expect(c.spanContext().traceId).toBe(producer!.spanContext().traceId)
        expect(c.parentSpanContext?.spanId).toBe(producer!.spanContext().spanId)
        expect(c.attributes).toMatchObject({
          'messaging.operation.type': 'process',
          'messaging.consumer.group.name': c.attributes['fleetstream.processor'],
          'fleetstream.stream.sequence': seq,
          'fleetstream.delivery.count': 1,
          'fleetstream.device.id': 'sensor-1',
          'fleetstream.correlation.id': event.correlationId,
          'fleetstream.hlc': event.hlc,
          'fleetstream.outcome': 'applied',
        })
        // ...linked to the span of the batch it was committed in, which links back to the event.
        const batchId = c.links[0]?.context.spanId
        const batch = spans.find((s) => s.spanContext().spanId === batchId)
        expect(batch, 'batch span').toBeDefined()
        expect(batch!.attributes['messaging.batch.message_count']).toBeGreaterThan(0)
        const link = batch!.links.find((l) => l.context.spanId === producer!.spanContext().spanId)
        expect(link?.attributes).toMatchObject({
          'messaging.message.id': event.eventId,
          'fleetstream.stream.sequence': seq,
        })
      }
    }
  })
})

/** A local OTLP/HTTP receiver: what Jaeger's port 4318 would be. */
interface Receiver {
  url: string
  spans(): OtlpSpan[]
  posts: number
  close(): Promise<void>
}

interface OtlpSpan {
  service: string
  /** The attributes of the span's resource (`service.*`, host, process). */
  resource: Record<string, unknown>
  traceId: string
  spanId: string
  parentSpanId: string
  name: string
  kind: number
  attributes: Record<string, unknown>
  links: { traceId: string; spanId: string }[]
}

async function startReceiver(): Promise<Receiver> {
  const received: OtlpSpan[] = []
  const r = { posts: 0 } as Receiver
  const server: Server = createServer((req, res) => {
    let body = ''
    req.on('data', (d: Buffer) => (body += d.toString()))
    req.on('end', () => {
      if (req.method === 'POST' && req.url === '/v1/traces') {
        r.posts++
        received.push(...flatten(JSON.parse(body) as OtlpRequest))
      }
      res.writeHead(200, { 'content-type': 'application/json' }).end('{}')
    })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  r.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
  r.spans = () => received
  r.close = () =>
    new Promise((resolve) => {
      server.close(() => {
        resolve()
      })
    })
  return r
}

interface OtlpValue {
  stringValue?: string
  intValue?: string | number
  boolValue?: boolean
  doubleValue?: number
}
interface OtlpRequest {
  resourceSpans: {
    resource: { attributes: { key: string; value: OtlpValue }[] }
    scopeSpans: {
      spans: {
        traceId: string
        spanId: string
        parentSpanId?: string
        name: string
        kind: number
        attributes?: { key: string; value: OtlpValue }[]
        links?: { traceId: string; spanId: string }[]
      }[]
    }[]
  }[]
}

function flatten(req: OtlpRequest): OtlpSpan[] {
  const value = (v: OtlpValue) =>
    v.stringValue ??
    (v.intValue !== undefined ? Number(v.intValue) : (v.boolValue ?? v.doubleValue))
  const attrs = (a: { key: string; value: OtlpValue }[] = []) =>
    Object.fromEntries(a.map((x) => [x.key, value(x.value)]))
  return req.resourceSpans.flatMap((rs) => {
    const resource = attrs(rs.resource.attributes)
    const service = String(resource['service.name'])
    return rs.scopeSpans.flatMap((ss) =>
      ss.spans.map((s) => ({
        service,
        resource,
        traceId: s.traceId,
        spanId: s.spanId,
        parentSpanId: s.parentSpanId ?? '',
        name: s.name,
        kind: s.kind,
        attributes: attrs(s.attributes),
        links: (s.links ?? []).map((l) => ({ traceId: l.traceId, spanId: l.spanId })),
      })),
    )
  })
}

const SPAN_KIND_PRODUCER = 4
const SPAN_KIND_CONSUMER = 5

describe('traces from real processes, exported over OTLP', () => {
  let nats: NatsServer
  let receiver: Receiver
  let env: Record<string, string>
  let otel: Record<string, string>
  beforeAll(async () => {
    nats = await startNatsServer()
    receiver = await startReceiver()
    env = testEnv(nats.url, await freshDatabase(), { ALERT_RULES_FILE: await rulesFile() })
    otel = {
      OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url,
      OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json',
      OTEL_BSP_SCHEDULE_DELAY: '200',
    }
    const setup = await runCli(['setup'], env)
    expect(setup.code, setup.output).toBe(0)
  })
  afterAll(async () => {
    await receiver.close()
    await nats.cleanup()
  })

  it('follows one event from the simulator through all three processors, with database spans', async () => {
    const run = spawnCli(['run'], { ...env, ...otel, LOG_LEVEL: 'info' })
    const sim = await runCli(
      ['simulate', '--devices', '3', '--rate', '30', '--duration', '2', '--duplicates', '0'],
      { ...env, ...otel },
    )
    expect(sim.code, sim.output).toBe(0)
    expect(sim.output).not.toContain('otel:')

    // A refused event carrying trace context: its DLQ log line leads to its trace.
    const { nc } = await natsAdmin(nats.url)
    const traceId = '4bf92f3577b34da6a3ce929d0e0e4736'
    const h = headers()
    h.set('traceparent', `00-${traceId}-00f067aa0ba902b7-01`)
    h.set('Fleet-Correlation-Id', 'corr-poison-1')
    nc.publish('fleet.events.sensor-x.reading', '{"not json', { headers: h })
    await nc.flush()
    await nc.close()

    const producers = () =>
      receiver
        .spans()
        .filter((s) => s.kind === SPAN_KIND_PRODUCER && s.service === 'fleetstream-simulate')
    const reading = () =>
      producers().find((s) => s.attributes['fleetstream.event.type'] === 'reading.recorded')
    await waitFor(
      'every processor to report a span for a published reading',
      () => {
        const r = reading()
        if (!r) return false
        return (
          receiver
            .spans()
            .filter((s) => s.parentSpanId === r.spanId && s.kind === SPAN_KIND_CONSUMER).length ===
          3
        )
      },
      30_000,
      () => `${receiver.spans().length} spans received in ${receiver.posts} posts`,
    )
    await waitFor('the poison event to be parked', () =>
      run.output().includes('event parked in the DLQ'),
    )
    run.child.kill('SIGTERM')
    expect(await run.exited).toBe(0)
    expect(run.output()).not.toContain('otel:')

    const spans = receiver.spans()
    const producer = reading()!
    expect(producer.attributes['messaging.message.id']).toEqual(expect.any(String))
    const consumers = spans.filter((s) => s.parentSpanId === producer.spanId)
    expect(consumers.every((s) => s.traceId === producer.traceId)).toBe(true)
    // Without OTEL_SERVICE_NAME each processor is a service of its own in Jaeger, though all three
    // run in one process: the same service.instance.id, the version of the package.
    const version = (
      JSON.parse(await readFile(new URL('../package.json', import.meta.url), 'utf8')) as {
        version: string
      }
    ).version
    for (const c of consumers) {
      expect(c.service).toBe(`fleetstream-${String(c.attributes['fleetstream.processor'])}`)
      expect(c.resource).toMatchObject({
        'service.version': version,
        'fleetstream.processor': c.attributes['fleetstream.processor'],
      })
    }
    expect(new Set(consumers.map((s) => s.service)).size).toBe(PROCESSOR_NAMES.length)
    const instances = new Set(consumers.map((s) => s.resource['service.instance.id']))
    expect(instances.size).toBe(1)
    expect([...instances][0]).toEqual(expect.stringMatching(/^.+-\d+$/))
    expect(producer.resource).toMatchObject({ 'service.version': version })
    expect(producer.resource['service.instance.id']).toEqual(expect.any(String))
    expect(consumers.map((s) => s.attributes['fleetstream.processor']).sort()).toEqual(
      [...PROCESSOR_NAMES].sort(),
    )
    for (const c of consumers) {
      const batch = spans.find((s) => s.spanId === c.links[0]?.spanId)
      expect(batch, `batch span of ${String(c.attributes['fleetstream.processor'])}`).toBeDefined()
      expect(batch!.links.some((l) => l.spanId === producer.spanId)).toBe(true)
      // The batch's transaction, from the pg instrumentation, beneath the batch span.
      const db = spans.filter((s) => s.parentSpanId === batch!.spanId && s.name.startsWith('pg.'))
      expect(db.map((s) => s.name)).toEqual(
        expect.arrayContaining([expect.stringMatching(/^pg\.query/)]),
      )
      // ...and in the processor's service, not in the process's.
      expect(batch!.service).toBe(c.service)
      expect(db.every((s) => s.service === c.service)).toBe(true)
    }

    const parked = run
      .output()
      .split('\n')
      .filter((l) => l.includes('event parked in the DLQ'))
      .map((l) => JSON.parse(l) as Record<string, unknown>)
    expect(parked[0]).toMatchObject({ traceId, correlationId: 'corr-poison-1' })
    expect(parked[0]?.spanId).toMatch(/^[0-9a-f]{16}$/)
  })

  it('OTEL_SERVICE_NAME, when set, is the service of every processor, told apart by its resource', async () => {
    const run = spawnCli(['run'], { ...env, ...otel, OTEL_SERVICE_NAME: 'fleet-east' })
    const sim = await runCli(
      ['simulate', '--devices', '1', '--rate', '10', '--duration', '1', '--duplicates', '0'],
      { ...env, ...otel, OTEL_SERVICE_NAME: 'fleet-east-sim' },
    )
    expect(sim.code, sim.output).toBe(0)
    const consumersOf = (producer: OtlpSpan) =>
      receiver
        .spans()
        .filter((s) => s.parentSpanId === producer.spanId && s.kind === SPAN_KIND_CONSUMER)
    const reading = () =>
      receiver
        .spans()
        .find(
          (s) =>
            s.service === 'fleet-east-sim' &&
            s.kind === SPAN_KIND_PRODUCER &&
            s.attributes['fleetstream.event.type'] === 'reading.recorded' &&
            consumersOf(s).length === 3,
        )
    await waitFor('every processor to report a span for a published reading', () =>
      Boolean(reading()),
    )
    run.child.kill('SIGTERM')
    expect(await run.exited).toBe(0)
    const consumers = consumersOf(reading()!)
    expect(consumers.map((s) => s.service)).toEqual(['fleet-east', 'fleet-east', 'fleet-east'])
    expect(consumers.map((s) => s.resource['fleetstream.processor']).sort()).toEqual(
      [...PROCESSOR_NAMES].sort(),
    )
  })

  it('without an endpoint nothing is exported and nothing complains; a dead endpoint is not an error', async () => {
    const before = receiver.posts
    const off = await runCli(['simulate', '--devices', '2', '--rate', '20', '--duration', '1'], env)
    expect(off.code, off.output).toBe(0)
    expect(off.output).not.toContain('otel')
    expect(receiver.posts).toBe(before)

    const dead = await runCli(['simulate', '--devices', '2', '--rate', '20', '--duration', '1'], {
      ...env,
      OTEL_EXPORTER_OTLP_ENDPOINT: 'http://127.0.0.1:9', // discard port: nothing listens
    })
    expect(dead.code, dead.output).toBe(0)
  })
})
