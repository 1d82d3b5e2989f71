"""The event bus on RabbitMQ (pika): topology, publishers and the retrying consumer.

- `topology`: connection parameters, the exchange (with its unrouted alternate) and each
  consumer's queue, retry queue and parking queue.
- `messages`: message properties and headers (retry and parking ones included), `event_context`.
- `publisher`: `Publisher`, one confirmed message at a time, one connection per thread.
- `batch_publisher`: `BatchPublisher`, a batch with pipelined confirms (the outbox relay's).
- `consumer`: `Consumer`, manual acks, bounded retries, parking, an optional batch handler; it
  refuses (parks, reports) what its producer did not sign or may not publish.
- `signing`: Ed25519 signatures of every message, the producers' public keys, which producer may
  publish which event type, and the process's keys (`load_signing`, `configure`, `current`).
- `users`: each service's own broker user and what the broker lets it do (permissions, topic
  permissions, the deployment's broker definitions, and rabbitmqctl for development stacks).

Processed-event idempotency lives in `services.kit.processed_events`; the consumer is given it.
pika is not thread-safe: `Publisher` keeps one connection per thread; `BatchPublisher` and
`Consumer` each belong to the one thread that calls them.
"""

from services.kit.bus.batch_publisher import BatchPublisher
from services.kit.bus.consumer import Consumer
from services.kit.bus.messages import (
    CONTENT_TYPE,
    HEADER_AGENCY,
    HEADER_ERROR_REASON,
    HEADER_ERROR_TYPE,
    HEADER_PARKED_AT,
    HEADER_PARKED_BY,
    HEADER_PRODUCER,
    HEADER_RETRY_COUNT,
    event_context,
    message_properties,
)
from services.kit.bus.publisher import Publisher, PublishError
from services.kit.bus.signing import (
    HEADER_SIGNATURE,
    HEADER_SIGNER,
    EventRefused,
    ProducerKeys,
    Refusal,
    Signer,
    Signing,
)
from services.kit.bus.topology import DEFAULT_EXCHANGE, Topology, connection_parameters
from services.kit.events import MalformedEvent, PermanentError

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_EXCHANGE",
    "HEADER_AGENCY",
    "HEADER_ERROR_REASON",
    "HEADER_ERROR_TYPE",
    "HEADER_PARKED_AT",
    "HEADER_PARKED_BY",
    "HEADER_PRODUCER",
    "HEADER_RETRY_COUNT",
    "HEADER_SIGNATURE",
    "HEADER_SIGNER",
    "BatchPublisher",
    "Consumer",
    "EventRefused",
    "MalformedEvent",
    "PermanentError",
    "ProducerKeys",
    "PublishError",
    "Publisher",
    "Refusal",
    "Signer",
    "Signing",
    "Topology",
    "connection_parameters",
    "event_context",
    "message_properties",
]
