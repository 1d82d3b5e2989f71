"""Publishing a batch with pipelined confirms: `BatchPublisher`, the outbox relay's publisher.

It drives a pika SelectConnection in the calling thread, so an instance belongs to one thread.
Every message is signed (services.kit.bus.signing). Each confirmed event is counted by routing key
(services.kit.metrics).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import pika
import pika.exceptions
from pika import spec
from pika.adapters.select_connection import IOLoop

from clinic.events.v1.envelope_pb2 import Envelope
from services.kit import metrics
from services.kit.bus import signing
from services.kit.bus.messages import broker_user, message_properties, publish_span
from services.kit.bus.topology import Topology, connection_parameters

__all__ = ["BatchPublisher"]

logger = logging.getLogger(__name__)


class BatchPublisher:
    """Publishes a batch of envelopes and then awaits all their confirms together.

    Waiting for one confirm per message costs a broker round trip (and an fsync) each; here
    every message of the batch is written first and the broker's Basic.Ack / Basic.Nack
    frames (often `multiple=True`) are matched back to event ids by delivery tag.

    It drives a pika SelectConnection's I/O loop in the calling thread, only while one of its
    methods runs (as pika's BlockingConnection does), so an instance belongs to one thread.
    Call `idle()` instead of sleeping between batches so heartbeats are answered. Each message is
    signed by `signer` (default: the process's, `signing.current()`) and carries the connection's
    broker user as user_id (which the broker checks).
    """

    def __init__(
        self,
        amqp_url: str,
        topology: Topology | None = None,
        *,
        declare_topology: bool = True,
        connection_name: str = "clinic-outbox-relay",
        confirm_timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        signer: signing.Signer | signing.Keyring | None = None,
    ):
        self.topology = topology or Topology()
        self._signer = signer or signing.current().signer
        self._params = connection_parameters(amqp_url, connection_name)
        self._user_id = broker_user(self._params)
        self._declare = declare_topology
        self._confirm_timeout_s = confirm_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._ioloop = IOLoop()
        self._connection: pika.SelectConnection | None = None
        self._channel = None
        self._ready = False
        self._closed = True
        self._open_failed = False
        self._next_tag = 1
        self._pending: dict[int, str] = {}
        self._confirmed: set[str] = set()
        self._returned: set[str] = set()
        self._waiting: Callable[[], bool] | None = None
        self._in_loop = False
        self._connect_failures = 0
        self._retry_connect_at = 0.0

    # -- public ------------------------------------------------------------------------------

    def publish_batch(
        self,
        envelopes: Sequence[Envelope],
        timeout_s: float | None = None,
        traceparents: Mapping[str, str] | None = None,
    ) -> set[str]:
        """Publish all envelopes, await their confirms; return the event ids the broker confirmed.
        `traceparents` (event id -> W3C traceparent) continues the traces that staged them.

        Nacked, returned (unroutable) and unanswered ones are left out: the caller keeps them and
        tries again later. Never raises for broker trouble; an unreachable broker yields an empty set.
        """
        if not envelopes:
            return set()
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self._confirm_timeout_s)
        if not self._ensure_ready():
            return set()
        self._pump()
        if not self._ready and not self._ensure_ready():
            return set()
        self._confirmed, self._returned = set(), set()
        exchange = self.topology.exchange_name
        try:
            for envelope in envelopes:
                self._pending[self._next_tag] = envelope.event_id
                self._next_tag += 1
                body = envelope.SerializeToString()
                signature = self._signer.headers(envelope.event_type, body, envelope.producer)
                # (None, {}) while tracing is off
                traced, trace = publish_span(envelope, (traceparents or {}).get(envelope.event_id))
                try:
                    self._channel.basic_publish(
                        exchange, envelope.event_type, body,
                        message_properties(envelope, signature, self._user_id, trace), mandatory=True,
                    )
                finally:
                    if traced is not None:
                        traced.finish()
        except pika.exceptions.AMQPError as exc:
            logger.warning("publishing a batch failed", extra={"error_type": type(exc).__name__})
            self._pending.clear()
            self._reset()
            return set()
        self._run_until(lambda: not self._pending or not self._ready, deadline)
        confirmed = self._confirmed - self._returned
        if self._pending:
            logger.warning("confirms did not all arrive; reconnecting",
                           extra={"count": len(self._pending), "batch": len(envelopes)})
            self._pending.clear()
            self._reset()
        self._confirmed, self._returned = set(), set()
        if confirmed:
            metrics.published(Counter(e.event_type for e in envelopes if e.event_id in confirmed))
        return confirmed

    def idle(self, seconds: float) -> None:
        """Wait, answering heartbeats and noticing a closed connection meanwhile."""
        if self._ready:
            self._run_until(lambda: not self._ready, time.monotonic() + seconds)
        else:
            time.sleep(seconds)

    def close(self) -> None:
        self._reset()
        self._ioloop.close()

    # -- connection life ----------------------------------------------------------------------

    def _ensure_ready(self) -> bool:
        if self._ready:
            return True
        if time.monotonic() < self._retry_connect_at:
            return False
        self._reset()
        try:
            if self._declare:
                with pika.BlockingConnection(self._params) as declaring:
                    self.topology.ensure(declaring)
            self._open_failed = False
            self._closed = False
            self._connection = pika.SelectConnection(
                self._params,
                on_open_callback=self._on_connection_open,
                on_open_error_callback=self._on_connection_open_error,
                on_close_callback=self._on_connection_closed,
                custom_ioloop=self._ioloop,
            )
            self._run_until(lambda: self._ready or self._open_failed or self._closed,
                            time.monotonic() + self._connect_timeout_s)
        except pika.exceptions.AMQPError as exc:
            logger.warning("cannot reach the broker", extra={"error_type": type(exc).__name__})
        if self._ready:
            self._connect_failures = 0
            return True
        self._reset()
        self._connect_failures += 1
        delay = min(30.0, 0.5 * 2 ** (self._connect_failures - 1))
        self._retry_connect_at = time.monotonic() + delay
        logger.warning("batch publisher not connected; next attempt later",
                       extra={"delay_s": delay, "attempt": self._connect_failures})
        return False

    def _reset(self) -> None:
        """Drop the connection (if any) so the next call starts from a fresh one."""
        self._ready = False
        self._pending.clear()
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and not connection.is_closed and not connection.is_closing:
            try:
                connection.close()
                self._run_until(lambda: self._closed, time.monotonic() + 2.0)
            except pika.exceptions.AMQPError:
                pass
        self._closed = True

    def _on_connection_open(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_open_error(self, _connection: pika.SelectConnection, error: BaseException) -> None:
        logger.warning("broker connection failed to open", extra={"error_type": type(error).__name__})
        self._open_failed = True
        self._wake()

    def _on_connection_closed(self, _connection: pika.SelectConnection, error: BaseException) -> None:
        if self._connection is _connection and not isinstance(error, pika.exceptions.ConnectionClosedByClient):
            logger.warning("broker connection closed", extra={"error_type": type(error).__name__})
        self._ready = False
        self._closed = True
        self._wake()

    def _on_channel_open(self, channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirm_mode)

    def _on_confirm_mode(self, _frame) -> None:
        self._next_tag = 1
        self._ready = True
        self._wake()

    def _on_channel_closed(self, _channel, error: BaseException) -> None:
        if isinstance(error, pika.exceptions.ChannelClosedByBroker):
            logger.warning("publishing channel closed by the broker: %s %s", error.reply_code, error.reply_text,
                           extra={"error_type": type(error).__name__})
        self._ready = False
        connection = self._connection
        if connection is not None and connection.is_open:
            connection.close()
        self._wake()

    # -- confirms -----------------------------------------------------------------------------

    def _on_confirm(self, frame) -> None:
        method = frame.method
        acked = isinstance(method, spec.Basic.Ack)
        if method.multiple:
            tags = list(itertools.takewhile(lambda t: t <= method.delivery_tag, self._pending))
        else:
            tags = [method.delivery_tag] if method.delivery_tag in self._pending else []
        for tag in tags:
            event_id = self._pending.pop(tag)
            if acked:
                self._confirmed.add(event_id)
            else:
                logger.warning("event nacked by the broker", extra={"event_id": event_id})
        self._wake()

    def _on_return(self, _channel, method, properties, _body) -> None:
        self._returned.add(properties.message_id)
        logger.warning("event returned unroutable: %s %s", method.reply_code, method.reply_text,
                       extra={"event_id": properties.message_id, "event_type": properties.type})

    # -- driving the I/O loop -----------------------------------------------------------------

    def _pump(self) -> None:
        """Process whatever I/O is ready right now (a closed socket, heartbeats), without waiting."""
        if self._connection is not None:
            self._run_once()

    def _run_once(self) -> None:
        timer = self._ioloop.call_later(0, self._ioloop.stop)
        self._in_loop = True
        try:
            self._ioloop.start()
        finally:
            self._in_loop = False
            self._ioloop.remove_timeout(timer)

    def _run_until(self, done: Callable[[], bool], deadline: float) -> bool:
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            timer = self._ioloop.call_later(remaining, self._ioloop.stop)
            self._waiting = done
            self._in_loop = True
            try:
                self._ioloop.start()
            finally:
                self._in_loop = False
                self._waiting = None
                self._ioloop.remove_timeout(timer)
        return True

    def _wake(self) -> None:
        if self._in_loop and self._waiting is not None and self._waiting():
            self._ioloop.stop()
