"""Publishing, one confirmed message at a time: `Publisher`, for simple callers.

pika is not thread-safe: `Publisher` keeps one connection per thread. Every message is signed
(services.kit.bus.signing). Each confirmed event is counted by routing key (services.kit.metrics).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from clinic.events.v1.envelope_pb2 import Envelope
from services.kit import metrics
from services.kit.bus import signing
from services.kit.bus.messages import broker_user, log_extra, message_properties, publish_span
from services.kit.bus.topology import Topology, connection_parameters

__all__ = ["PublishError", "Publisher"]

logger = logging.getLogger(__name__)


class PublishError(Exception):
    """Not every event was confirmed by the broker; the caller must keep them to try again."""


class Publisher:
    """Publishes envelopes with publisher confirms and `mandatory`, waiting for each confirm.

    Thread-safe by keeping one connection and channel per thread. After a lost connection the
    next call reconnects (redeclaring the topology) and carries on with the unconfirmed rest.
    Each message is signed by `signer` (default: the process's, `signing.current()`) and carries
    the connection's broker user as user_id (which the broker checks). With `declare_topology`
    the exchange is declared when missing (`Topology.ensure`).
    """

    def __init__(
        self,
        amqp_url: str,
        topology: Topology | None = None,
        *,
        declare_topology: bool = True,
        connection_name: str = "clinic-publisher",
        signer: signing.Signer | signing.Keyring | None = None,
    ):
        self.topology = topology or Topology()
        self._signer = signer or signing.current().signer
        self._params = connection_parameters(amqp_url, connection_name)
        self._user_id = broker_user(self._params)
        self._declare = declare_topology
        self._local = threading.local()

    def publish(self, envelopes: Iterable[Envelope]) -> None:
        """Publish every envelope; PublishError unless the broker confirmed all of them.

        On PublishError some may have been published already: retrying the whole list is
        safe because consumers deduplicate on event id.
        """
        pending = list(envelopes)
        confirmed: Counter[str] = Counter()
        try:
            self._publish(pending, confirmed)
        finally:
            metrics.published(confirmed)

    def _publish(self, pending: list[Envelope], confirmed: Counter[str]) -> None:
        index = 0
        reconnected = False
        while index < len(pending):
            envelope = pending[index]
            try:
                channel = self._channel()
                body = envelope.SerializeToString()
                signature = self._signer.headers(envelope.event_type, body, envelope.producer)
                traced, trace = publish_span(envelope)  # (None, {}) while tracing is off
                try:
                    channel.basic_publish(
                        self.topology.exchange_name, envelope.event_type, body,
                        message_properties(envelope, signature, self._user_id, trace), mandatory=True,
                    )
                finally:
                    if traced is not None:
                        traced.finish()
                confirmed[envelope.event_type] += 1
                index += 1
            except pika.exceptions.UnroutableError as exc:
                raise PublishError(f"event {envelope.event_id} was returned as unroutable") from exc
            except pika.exceptions.NackError as exc:
                raise PublishError(f"event {envelope.event_id} was nacked by the broker") from exc
            except pika.exceptions.ChannelClosedByBroker as exc:
                self._drop_channel()
                raise PublishError(f"broker closed the channel: {exc.reply_code} {exc.reply_text}") from exc
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as exc:
                self.close()
                if reconnected:
                    raise PublishError(f"broker connection lost: {type(exc).__name__}") from exc
                reconnected = True
                logger.warning("broker connection lost while publishing; reconnecting",
                               extra=log_extra(envelope, error_type=type(exc).__name__))

    def close(self) -> None:
        """Close this thread's connection (other threads' connections are theirs to close)."""
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        self._local.channel = None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except pika.exceptions.AMQPError:
                pass

    def _channel(self) -> BlockingChannel:
        channel = getattr(self._local, "channel", None)
        if channel is not None and channel.is_open:
            return channel
        connection = getattr(self._local, "connection", None)
        if connection is None or not connection.is_open:
            connection = pika.BlockingConnection(self._params)
            self._local.connection = connection
        channel = self.topology.ensure(connection) if self._declare else connection.channel()
        channel.confirm_delivery()
        self._local.channel = channel
        return channel

    def _drop_channel(self) -> None:
        self._local.channel = None

