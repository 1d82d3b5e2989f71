"""Where events go on the broker: connection parameters, the exchange, and each consumer's queues.

Names get `Topology.prefix + "."` in front when a prefix is set:

- `clinic.events`: durable topic exchange; routing key = event type (`message.delivered.v1`).
  Declared with `alternate-exchange` = `clinic.events.unrouted`, a durable fanout exchange bound
  to the durable queue `clinic.events.unrouted`, so an event nobody subscribes to yet is kept.
- per consumer queue `<queue>` (durable, bound to its routing keys; anything the broker
  dead-letters from it goes to parking), `<queue>.retry` (messages wait `retry_delay_ms`, then
  dead-letter back to `<queue>` through the default exchange) and `<queue>.parking` (events that
  failed for good; inspect and re-drive by hand). Retry and parking are reached through the
  default exchange, by queue name. A consumer of one process instance (e.g. a per-replica
  queue) sets `queue_expires_ms`: all three queues get `x-expires`, so the broker deletes them
  once unused for that long after the instance is gone. While it runs, the consumer redeclares
  the retry and parking queues (which have no consumer of their own) every third of that time,
  so they, and any parked events in them, live as long as the instance does.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pika
from pika.adapters.blocking_connection import BlockingChannel

__all__ = ["DEFAULT_EXCHANGE", "ConsumerQueues", "Topology", "connection_parameters"]

DEFAULT_EXCHANGE = "clinic.events"


@dataclass(frozen=True)
class Topology:
    """Exchange and queue names. `prefix` isolates tests and environments sharing a vhost."""

    exchange: str = DEFAULT_EXCHANGE
    prefix: str = ""

    def name(self, base: str) -> str:
        return f"{self.prefix}.{base}" if self.prefix else base

    @property
    def exchange_name(self) -> str:
        return self.name(self.exchange)

    @property
    def unrouted_name(self) -> str:
        return f"{self.exchange_name}.unrouted"

    def declare(self, channel: BlockingChannel) -> None:
        """Declare the exchange, its alternate exchange and the unrouted queue (idempotent)."""
        unrouted = self.unrouted_name
        channel.exchange_declare(unrouted, exchange_type="fanout", durable=True)
        channel.queue_declare(unrouted, durable=True)
        channel.queue_bind(unrouted, unrouted)
        channel.exchange_declare(
            self.exchange_name, exchange_type="topic", durable=True,
            arguments={"alternate-exchange": unrouted},
        )


@dataclass(frozen=True)
class ConsumerQueues:
    """One consumer's queue (already prefixed), its retry and parking queues and their arguments."""

    topology: Topology
    queue: str
    routing_keys: Sequence[str]
    retry_delay_ms: int
    expires_ms: int | None = None

    @property
    def retry_queue(self) -> str:
        return f"{self.queue}.retry"

    @property
    def parking_queue(self) -> str:
        return f"{self.queue}.parking"

    def declare(self, channel: BlockingChannel) -> None:
        """Declare the exchange topology and the three queues (idempotent)."""
        self.topology.declare(channel)
        self.declare_side_queues(channel)
        channel.queue_declare(
            self.queue, durable=True,
            # Anything the broker dead-letters (a reject, an expiry policy) is parked, not dropped.
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": self.parking_queue,
                       **self._expires()},
        )
        for routing_key in self.routing_keys:
            channel.queue_bind(self.queue, self.topology.exchange_name, routing_key=routing_key)

    def declare_side_queues(self, channel: BlockingChannel) -> None:
        """Parking and retry queues. Nothing consumes them, so with `x-expires` the broker counts
        them unused from their last declaration: redeclaring renews that lease (and recreates one
        the broker already removed)."""
        expires = self._expires()
        channel.queue_declare(self.parking_queue, durable=True, arguments=expires or None)
        channel.queue_declare(
            self.retry_queue, durable=True,
            arguments={
                "x-message-ttl": int(self.retry_delay_ms),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.queue,
                **expires,
            },
        )

    def _expires(self) -> dict:
        return {} if self.expires_ms is None else {"x-expires": int(self.expires_ms)}


def connection_parameters(
    amqp_url: str, connection_name: str, environ: Mapping[str, str] | None = None
) -> pika.URLParameters:
    """URL parameters plus a client-provided connection name (shown by rabbitmqctl and the UI).

    amqps:// is TLS with the broker's certificate verified and its host name checked: against
    AMQP_CA_FILE when set (a private CA), else the system's CAs. An `ssl_options` query argument
    in the URL (pika's own) is left as given."""
    params = pika.URLParameters(amqp_url)
    if params.ssl_options is not None and "ssl_options=" not in amqp_url:
        ca_file = (os.environ if environ is None else environ).get("AMQP_CA_FILE", "").strip() or None
        params.ssl_options = pika.SSLOptions(ssl.create_default_context(cafile=ca_file), server_hostname=params.host)
    params.client_properties = {"connection_name": connection_name}
    if params.blocked_connection_timeout is None:
        # A broker under a resource alarm blocks publishers; fail instead of hanging forever.
        params.blocked_connection_timeout = 60
    return params
