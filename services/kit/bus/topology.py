"""Where events go on the broker: connection parameters, the exchange, and each consumer's queues.

Names get `Topology.prefix + "."` in front when a prefix is set:

- `clinic.events`: durable topic exchange; routing key = event type (`message.delivered.v1`).
  Declared with `alternate-exchange` = `clinic.events.unrouted`, a durable fanout exchange bound
  to the durable queue `clinic.events.unrouted`, so an event nobody subscribes to yet is kept.
- per consumer queue `<queue>` (durable, bound to its routing keys; anything the broker
  dead-letters from it goes to parking), `<queue>.retry` (messages wait `retry_delay_ms`, then
  dead-letter back to `<queue>`) and `<queue>.parking` (events that failed for good; inspect and
  re-drive by hand). The three are reached through the consumer's own direct exchange
  `<queue>.republish` (auto-delete), each bound by its own name: the consumer republishes to
  retry and parking there, and the broker dead-letters there. Never through the default
  exchange: writing to it would let a service put messages into any queue of the vhost (the
  audit service's included), so a service's broker user may not (docs/bus-security.md). A
  consumer of one process instance (e.g. a per-replica queue) sets `queue_expires_ms`: all
  three queues get `x-expires`, so the broker deletes them once unused for that long after the
  instance is gone (and the exchange with its last binding). While it runs, the consumer
  redeclares the retry and parking queues (which have no consumer of their own) every third of
  that time, so they, and any parked events in them, live as long as the instance does.

Who declares what: the exchange, its alternate and the unrouted queue are shared, so a service's
broker user may not configure them (it could delete them); the launcher or the broker
definitions (deploy/rabbitmq/definitions.json) declare them. `Topology.ensure` declares them only
when they are missing, and a consumer declares only what it owns (`ConsumerQueues.open`).
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

__all__ = ["DEFAULT_EXCHANGE", "ConsumerQueues", "QueueHeldByAnotherDeployment", "Topology", "connection_parameters"]

DEFAULT_EXCHANGE = "clinic.events"
NOT_FOUND = 404
PRECONDITION_FAILED = 406

logger = logging.getLogger(__name__)


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

    def ensure(self, connection: BlockingConnection) -> BlockingChannel:
        """A channel of `connection` on which the exchange exists: checked passively (no configure
        permission needed, so a service's own broker user can), declared with `declare` only when
        missing. Returns the channel to go on with (a failed check closes the one it ran on)."""
        channel = connection.channel()
        try:
            channel.exchange_declare(self.exchange_name, passive=True)
            return channel
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != NOT_FOUND:
                raise
        channel = connection.channel()
        self.declare(channel)
        return channel


class QueueHeldByAnotherDeployment(Exception):
    """Another deployment's consumers are on this queue (ConsumerQueues.claim): consuming it too
    would silently split that deployment's events with this one."""

    def __init__(self, queue: str, holder: str, consumers: int):
        self.queue, self.holder, self.consumers = queue, holder, consumers
        super().__init__(
            f"queue {queue} is held by deployment {holder!r} ({consumers} consumer(s)); run this deployment on a"
            " vhost of its own (AMQP_URL) or with another CLINIC_DEPLOYMENT only once that one is gone"
        )


_DEPLOYMENT_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def deployment_name(value: str | None) -> str:
    """A CLINIC_DEPLOYMENT value as used (stripped), '' when unset; ValueError for one that is not
    1-64 letters, digits, '.', '_' or '-'."""
    name = (value or "").strip()
    if name and not _DEPLOYMENT_RE.match(name):
        raise ValueError(f"CLINIC_DEPLOYMENT must be 1-64 letters, digits, '.', '_' or '-', got {name!r}")
    return name


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

    @property
    def republish_exchange(self) -> str:
        """The direct exchange to the three queues (each bound by its own name)."""
        return f"{self.queue}.republish"

    @property
    def owner_queue(self) -> str:
        """`<queue>.owner`: one message, the name of the deployment whose consumers hold the queue."""
        return f"{self.queue}.owner"

    def claim(self, connection: BlockingConnection, deployment: str) -> str | None:
        """Hold the queue for `deployment`, or raise QueueHeldByAnotherDeployment.

        Two deployments (two copies of the system) on one vhost must not consume one queue: each
        would get part of the other's events. The queue's owner is the message in `<queue>.owner`
        (a durable queue of at most one message, reached through `<queue>.republish`). Free (no
        owner) or ours: claimed. Another deployment's, with consumers on the queue: refused. Another
        deployment's without a consumer (it was stopped or removed): taken over, with a warning.
        Returns the previous owner when it was another deployment. On a channel of its own."""
        channel = connection.channel()
        try:
            channel.confirm_delivery()
            channel.queue_declare(self.owner_queue, durable=True, arguments={"x-max-length": 1})
            channel.queue_bind(self.owner_queue, self.republish_exchange, routing_key=self.owner_queue)
            method, _properties, body = channel.basic_get(self.owner_queue, auto_ack=False)
            holder = body.decode("utf-8", "replace") if method is not None else None
            if method is not None:
                channel.basic_nack(method.delivery_tag, requeue=True)
            if holder == deployment:
                return None
            if holder is not None:
                consumers = channel.queue_declare(self.queue, passive=True).method.consumer_count
                if consumers > 0:
                    raise QueueHeldByAnotherDeployment(self.queue, holder, consumers)
                logger.warning("queue taken over from a deployment with no consumer on it",
                               extra={"queue": self.queue, "code": "queue_taken_over"})
            properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, content_type="text/plain")
            # x-max-length 1 drops the older owner (drop-head) when the new one is queued.
            channel.basic_publish(self.republish_exchange, self.owner_queue, deployment.encode(), properties,
                                  mandatory=True)
            return holder
        finally:
            if channel.is_open:
                channel.close()

    def declare(self, channel: BlockingChannel) -> None:
        """Declare the exchange topology and the three queues (idempotent; needs configure
        permission on the shared exchange: the launcher's, a test's)."""
        self.topology.declare(channel)
        self._declare_exchange(channel)
        for name, arguments in self.declarations():
            channel.queue_declare(name, durable=True, arguments=arguments)
        self._bind(channel)

    def open(self, connection: BlockingConnection) -> BlockingChannel:
        """Declare what this consumer owns on `connection` (the exchange only if missing,
        `Topology.ensure`) and return the channel to go on with.

        A queue declared before the three were reached through `<queue>.republish` dead-letters
        through the default exchange; the broker refuses to redeclare it with other arguments.
        It keeps working as it is (dead-lettering is the broker's own, whoever may write where),
        so it is used as found, with a warning; recreate it (drained) to finish the change."""
        channel = self.topology.ensure(connection)
        self._declare_exchange(channel)
        for name, arguments in self.declarations():
            try:
                channel.queue_declare(name, durable=True, arguments=arguments)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != PRECONDITION_FAILED or "'x-dead-letter-exchange'" not in exc.reply_text:
                    raise
                logger.warning("queue declared with the earlier dead-letter arguments; used as it is",
                               extra={"queue": name})
                channel = connection.channel()
                channel.queue_declare(name, passive=True)
        self._bind(channel)
        return channel

    def declare_side_queues(self, channel: BlockingChannel) -> None:
        """Parking and retry queues (and the exchange that reaches them). Nothing consumes them, so
        with `x-expires` the broker counts them unused from their last declaration: redeclaring
        renews that lease (and recreates one the broker already removed)."""
        self._declare_exchange(channel)
        for name, arguments in self.declarations()[1:]:  # parking, retry
            channel.queue_declare(name, durable=True, arguments=arguments)
            channel.queue_bind(name, self.republish_exchange, routing_key=name)

    def declarations(self) -> list[tuple[str, dict | None]]:
        """(name, arguments) of the queue, its parking and its retry queue. Whatever the broker
        dead-letters goes through `<queue>.republish`: from the queue (a reject, an expiry policy)
        to parking, never dropped; from retry, after its delay, back to the queue."""
        expires = self._expires()
        via = {"x-dead-letter-exchange": self.republish_exchange}
        return [
            (self.queue, {**via, "x-dead-letter-routing-key": self.parking_queue, **expires}),
            (self.parking_queue, expires or None),
            (self.retry_queue,
             {"x-message-ttl": int(self.retry_delay_ms), **via, "x-dead-letter-routing-key": self.queue, **expires}),
        ]

    def _declare_exchange(self, channel: BlockingChannel) -> None:
        # Auto-delete: gone with the last of the three queues (per-instance queues expire).
        channel.exchange_declare(self.republish_exchange, exchange_type="direct", durable=True, auto_delete=True)

    def bindings(self) -> list[tuple[str, str, str]]:
        """(exchange, queue, routing key): each queue to the republish exchange by its name, the
        queue to the events exchange by each of its routing keys."""
        own = [(self.republish_exchange, name, name) for name in (self.queue, self.parking_queue, self.retry_queue)]
        return own + [(self.topology.exchange_name, self.queue, key) for key in self.routing_keys]

    def _bind(self, channel: BlockingChannel) -> None:
        for exchange, queue, routing_key in self.bindings():
            channel.queue_bind(queue, exchange, routing_key=routing_key)

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
