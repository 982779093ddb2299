/**
 * Span attribute names: OpenTelemetry messaging conventions where one exists, `fleetstream.*` for
 * the rest.
 */
export const Attr = {
  MessagingSystem: 'messaging.system',
  MessagingOperationType: 'messaging.operation.type',
  MessagingOperationName: 'messaging.operation.name',
  MessagingDestination: 'messaging.destination.name',
  MessagingConsumerGroup: 'messaging.consumer.group.name',
  MessagingMessageId: 'messaging.message.id',
  MessagingConversationId: 'messaging.message.conversation_id',
  MessagingBodySize: 'messaging.message.body.size',
  MessagingBatchCount: 'messaging.batch.message_count',
  StreamSequence: 'fleetstream.stream.sequence',
  DeliveryCount: 'fleetstream.delivery.count',
  DeviceId: 'fleetstream.device.id',
  CorrelationId: 'fleetstream.correlation.id',
  Hlc: 'fleetstream.hlc',
  EventType: 'fleetstream.event.type',
  Processor: 'fleetstream.processor',
  Duplicate: 'fleetstream.duplicate',
  Outcome: 'fleetstream.outcome',
  DlqReason: 'fleetstream.dlq.reason',
} as const
