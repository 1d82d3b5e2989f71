"""The event bus on RabbitMQ (pika): topology, publishers and the retrying, idempotent consumer.

Topology (names get `Topology.prefix + "."` in front when a prefix is set):

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

Messages: body = serialized Envelope, persistent, content type `application/x-protobuf`,
message_id = event id, type = event type, correlation_id, timestamp (s), app_id = producer and
headers `x-producer`, `x-agency-id`. Retries add `x-retry-count`; parking adds `x-error-type`,
`x-error-reason`, `x-parked-at` (epoch ms) and `x-parked-by` (queue). No payload content is ever
put in headers or logs.

pika is not thread-safe: `Publisher` keeps one connection per thread; `BatchPublisher` and
`Consumer` each belong to the one thread that calls them.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pika
import pika.exceptions
import pymongo.errors
from pika import spec
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.select_connection import IOLoop
from pymongo.database import Database

from clinic.events.v1.envelope_pb2 import Envelope
from services.kit.events import MalformedEvent, PermanentError, decode_envelope, failure_summary
from services.kit.logs import accept_correlation_id, correlation_id_var, event_id_var
from services.kit.mongo import now_ms

__all__ = [
    "BatchPublisher",
    "Consumer",
    "MalformedEvent",
    "PermanentError",
    "ProcessedEvents",
    "PublishError",
    "Publisher",
    "Topology",
    "event_context",
]

logger = logging.getLogger(__name__)

DEFAULT_EXCHANGE = "clinic.events"
CONTENT_TYPE = "application/x-protobuf"
HEADER_PRODUCER = "x-producer"
HEADER_AGENCY = "x-agency-id"
HEADER_RETRY_COUNT = "x-retry-count"
HEADER_ERROR_TYPE = "x-error-type"
HEADER_ERROR_REASON = "x-error-reason"
HEADER_PARKED_AT = "x-parked-at"
HEADER_PARKED_BY = "x-parked-by"
# Broker-owned dead-letter bookkeeping; carrying it into a republish makes the broker see a
# dead-letter cycle and drop the message, so it is stripped.
_BROKER_HEADERS = ("x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
                   "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason")


class PublishError(Exception):
    """Not every event was confirmed by the broker; the caller must keep them to try again."""


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


def connection_parameters(amqp_url: str, connection_name: str) -> pika.URLParameters:
    """URL parameters plus a client-provided connection name (shown by rabbitmqctl and the UI)."""
    params = pika.URLParameters(amqp_url)
    params.client_properties = {"connection_name": connection_name}
    if params.blocked_connection_timeout is None:
        # A broker under a resource alarm blocks publishers; fail instead of hanging forever.
        params.blocked_connection_timeout = 60
    return params


def message_properties(envelope: Envelope) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type=CONTENT_TYPE,
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=envelope.event_id,
        type=envelope.event_type,
        correlation_id=envelope.correlation_id or None,
        timestamp=envelope.occurred_at.seconds or int(time.time()),
        app_id=envelope.producer or None,
        headers={HEADER_PRODUCER: envelope.producer, HEADER_AGENCY: envelope.agency_id},
    )


def _log_extra(envelope: Envelope | None, **more: object) -> dict:
    extra: dict[str, object] = dict(more)
    if envelope is not None:
        extra.update(
            event_id=envelope.event_id, event_type=envelope.event_type, correlation_id=envelope.correlation_id
        )
    return extra


# --------------------------------------------------------------------------------------------------
# Publishing, one confirmed message at a time (simple callers)
# --------------------------------------------------------------------------------------------------


class Publisher:
    """Publishes envelopes with publisher confirms and `mandatory`, waiting for each confirm.

    Thread-safe by keeping one connection and channel per thread. After a lost connection the
    next call reconnects (redeclaring the topology) and carries on with the unconfirmed rest.
    """

    def __init__(
        self,
        amqp_url: str,
        topology: Topology | None = None,
        *,
        declare_topology: bool = True,
        connection_name: str = "clinic-publisher",
    ):
        self.topology = topology or Topology()
        self._params = connection_parameters(amqp_url, connection_name)
        self._declare = declare_topology
        self._local = threading.local()

    def publish(self, envelopes: Iterable[Envelope]) -> None:
        """Publish every envelope; PublishError unless the broker confirmed all of them.

        On PublishError some may have been published already: retrying the whole list is
        safe because consumers deduplicate on event id.
        """
        pending = list(envelopes)
        index = 0
        reconnected = False
        while index < len(pending):
            envelope = pending[index]
            try:
                channel = self._channel()
                channel.basic_publish(
                    self.topology.exchange_name, envelope.event_type, envelope.SerializeToString(),
                    message_properties(envelope), mandatory=True,
                )
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
                               extra=_log_extra(envelope, error_type=type(exc).__name__))

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
        channel = connection.channel()
        if self._declare:
            self.topology.declare(channel)
        channel.confirm_delivery()
        self._local.channel = channel
        return channel

    def _drop_channel(self) -> None:
        self._local.channel = None


# --------------------------------------------------------------------------------------------------
# Publishing a batch with pipelined confirms (the outbox relay)
# --------------------------------------------------------------------------------------------------


class BatchPublisher:
    """Publishes a batch of envelopes and then awaits all their confirms together.

    Waiting for one confirm per message costs a broker round trip (and an fsync) each; here
    every message of the batch is written first and the broker's Basic.Ack / Basic.Nack
    frames (often `multiple=True`) are matched back to event ids by delivery tag.

    It drives a pika SelectConnection's I/O loop in the calling thread, only while one of its
    methods runs (as pika's BlockingConnection does), so an instance belongs to one thread.
    Call `idle()` instead of sleeping between batches so heartbeats are answered.
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
    ):
        self.topology = topology or Topology()
        self._params = connection_parameters(amqp_url, connection_name)
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

    def publish_batch(self, envelopes: Sequence[Envelope], timeout_s: float | None = None) -> set[str]:
        """Publish all envelopes, await their confirms; return the event ids the broker confirmed.

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
                self._channel.basic_publish(
                    exchange, envelope.event_type, envelope.SerializeToString(),
                    message_properties(envelope), mandatory=True,
                )
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
                    self.topology.declare(declaring.channel())
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


# --------------------------------------------------------------------------------------------------
# Consuming
# --------------------------------------------------------------------------------------------------


class ProcessedEvents:
    """Event ids a consumer has finished, so a redelivered event has its effect once.

    Stored as `{"_id": "<consumer>:<event_id>", "processed_at": <epoch ms>}`: the primary key is
    the uniqueness guarantee on nx-27017 and on MongoDB alike.

    The id is recorded after the handler succeeds, so a crash between the handler's effect and
    the record redelivers the event: handlers must make their own effects idempotent keyed by
    the event id (upsert on a key derived from it, `$setOnInsert`, a unique index) for that window.
    """

    COLLECTION = "processed_events"

    def __init__(self, db: Database, consumer_name: str, collection: str = COLLECTION):
        self.consumer_name = consumer_name
        self._collection = db[collection]

    def _key(self, event_id: str) -> str:
        return f"{self.consumer_name}:{event_id}"

    def seen(self, event_id: str) -> bool:
        return self._collection.find_one({"_id": self._key(event_id)}, {"_id": 1}) is not None

    def record(self, event_id: str) -> bool:
        """Remember the event; False when it was already recorded."""
        try:
            self._collection.insert_one(
                {"_id": self._key(event_id), "consumer": self.consumer_name, "processed_at": now_ms()}
            )
        except pymongo.errors.DuplicateKeyError:
            return False
        return True

    def seen_among(self, event_ids: Sequence[str]) -> set[str]:
        """Which of these events were already processed: one `_id $in` query."""
        if not event_ids:
            return set()
        keys = {self._key(event_id): event_id for event_id in event_ids}
        found = self._collection.find({"_id": {"$in": list(keys)}}, {"_id": 1})
        return {keys[doc["_id"]] for doc in found}

    def record_all(self, event_ids: Sequence[str]) -> None:
        """Remember these events in one write; ones recorded already are left as they are."""
        if not event_ids:
            return
        at = now_ms()
        docs = [{"_id": self._key(e), "consumer": self.consumer_name, "processed_at": at} for e in event_ids]
        try:
            self._collection.insert_many(docs, ordered=False)
        except pymongo.errors.BulkWriteError as exc:
            if any(error.get("code") != 11000 for error in exc.details.get("writeErrors", [])):
                raise


@contextmanager
def event_context(envelope: Envelope) -> Iterator[None]:
    """Logs and outgoing calls made while handling `envelope` carry its correlation and event ids."""
    tokens = (
        correlation_id_var.set(accept_correlation_id(envelope.correlation_id) or envelope.event_id),
        event_id_var.set(envelope.event_id),
    )
    try:
        yield
    finally:
        event_id_var.reset(tokens[1])
        correlation_id_var.reset(tokens[0])


class _Reconnect(Exception):
    """Leave the current connection and start over (broker cancelled us, or a republish failed)."""


class Consumer:
    """Consumes a durable queue bound to routing keys with manual acks, bounded retries and parking.

    For each delivery: bytes that are not an envelope go to `<queue>.parking`; an event already
    in `processed` is acked and skipped; otherwise `handler(envelope)` runs. On success the event
    id is recorded and the message acked. A PermanentError (MalformedEvent included) parks the
    event; any other exception republishes it (confirmed) to `<queue>.retry` with
    `x-retry-count` + 1, or parks it once `max_retries` retries have failed. The delivery is
    acked only after that republish was confirmed; if it cannot be, the connection is dropped
    and the broker redelivers the message.

    `run()` blocks, reconnecting with backoff (and redeclaring everything) when the connection
    drops; `stop()` (any thread, or a signal handler) lets the in-flight message finish, then
    closes. `running()` runs it in a thread for tests and embedding.

    With a `batch_handler`, the deliveries that arrived together (at most `prefetch`) are
    handled as one batch: one `processed` query leaves out those already done, then
    `batch_handler(envelopes)` does what it can for all of them at once and returns the ones
    it left alone. The ones it did are recorded (one write) and acked; the ones it left, and
    all of them if it raises, go one by one through `handler` as above (retries, parking).
    So a batch handler must leave every effect in a state that `handler` can repeat safely
    (the same idempotency keys), and must leave alone any event it cannot finish by itself.
    """

    def __init__(
        self,
        amqp_url: str,
        queue: str,
        routing_keys: Sequence[str],
        handler: Callable[[Envelope], None],
        *,
        topology: Topology | None = None,
        processed: ProcessedEvents | None = None,
        prefetch: int = 16,
        max_retries: int = 5,
        retry_delay_ms: int = 5_000,
        reconnect_delay_s: tuple[float, float] = (0.5, 30.0),
        connection_name: str | None = None,
        queue_expires_ms: int | None = None,
        batch_handler: Callable[[list[Envelope]], list[Envelope]] | None = None,
    ):
        if queue_expires_ms is not None and queue_expires_ms <= 0:
            raise ValueError("queue_expires_ms must be positive")
        self.topology = topology or Topology()
        self.queue = self.topology.name(queue)
        self.retry_queue = f"{self.queue}.retry"
        self.parking_queue = f"{self.queue}.parking"
        self.routing_keys = list(routing_keys)
        self.max_retries = max_retries
        self.retry_delay_ms = retry_delay_ms
        self.queue_expires_ms = queue_expires_ms
        self._handler = handler
        self._batch_handler = batch_handler
        self._batch: list[tuple] = []  # deliveries of one pump, when batch_handler is set
        self._processed = processed
        self._prefetch = prefetch
        self._reconnect_delay_s = reconnect_delay_s
        self._params = connection_parameters(amqp_url, connection_name or f"clinic-consumer:{self.queue}")
        self._stopping = threading.Event()
        self._consuming = threading.Event()
        self._cancelled_by_broker = False
        self._publish_channel: BlockingChannel | None = None
        self._thread: threading.Thread | None = None
        self.sessions = 0  # broker connections that reached consuming (reconnections show as > 1)

    # -- lifecycle ------------------------------------------------------------------------------

    def run(self) -> None:
        """Consume until stop(); reconnect with exponential backoff after connection loss."""
        failures = 0
        while not self._stopping.is_set():
            sessions = self.sessions
            try:
                self._consume_once()
            except Exception as exc:  # the loop must survive anything that is not a stop request
                self._consuming.clear()
                if self.sessions > sessions:
                    failures = 0  # it was consuming: this is a fresh outage, start the backoff over
                delay = min(self._reconnect_delay_s[1], self._reconnect_delay_s[0] * 2 ** failures)
                delay *= random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not security
                failures = min(failures + 1, 16)
                logger.warning("consumer disconnected (%s); reconnecting", failure_summary(exc),
                               extra={"queue": self.queue, "error_type": type(exc).__name__, "delay_s": delay})
                self._stopping.wait(delay)
        self._consuming.clear()

    def stop(self) -> None:
        self._stopping.set()

    def start(self) -> threading.Thread:
        """Run in a daemon thread; returns it."""
        self._stopping.clear()
        self._thread = threading.Thread(target=self.run, name=f"consumer:{self.queue}", daemon=True)
        self._thread.start()
        return self._thread

    def wait_until_consuming(self, timeout: float) -> bool:
        return self._consuming.wait(timeout)

    @property
    def consuming(self) -> bool:
        return self._consuming.is_set()

    @contextmanager
    def running(self, timeout: float = 10.0) -> Iterator[Consumer]:
        """Run in a thread for the `with` block; stop and join on exit."""
        thread = self.start()
        try:
            if not self.wait_until_consuming(timeout):
                raise TimeoutError(f"consumer of {self.queue} did not start within {timeout}s")
            yield self
        finally:
            self.stop()
            thread.join(timeout)

    def declare(self, channel: BlockingChannel) -> None:
        """Declare the exchange topology and this consumer's three queues (idempotent)."""
        self.topology.declare(channel)
        self._declare_side_queues(channel)
        channel.queue_declare(
            self.queue, durable=True,
            # Anything the broker dead-letters (a reject, an expiry policy) is parked, not dropped.
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": self.parking_queue,
                       **self._expires()},
        )
        for routing_key in self.routing_keys:
            channel.queue_bind(self.queue, self.topology.exchange_name, routing_key=routing_key)

    def _expires(self) -> dict:
        return {} if self.queue_expires_ms is None else {"x-expires": int(self.queue_expires_ms)}

    def _declare_side_queues(self, channel: BlockingChannel) -> None:
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

    # -- one connection's life ----------------------------------------------------------------------

    def _consume_once(self) -> None:
        connection = pika.BlockingConnection(self._params)
        try:
            channel = connection.channel()
            self.declare(channel)
            publish_channel = connection.channel()
            publish_channel.confirm_delivery()
            self._publish_channel = publish_channel
            channel.basic_qos(prefetch_count=self._prefetch)
            self._cancelled_by_broker = False
            channel.add_on_cancel_callback(self._on_cancelled_by_broker)
            channel.basic_consume(self.queue, self._on_message, auto_ack=False)
            self.sessions += 1
            self._consuming.set()
            logger.info("consuming", extra={"queue": self.queue})
            # The consumed queue is in use while we consume it; the other two must be redeclared
            # well within their expiry or the broker deletes them (parked events included) under
            # a live instance.
            renew_every_s = None if self.queue_expires_ms is None else self.queue_expires_ms / 3000
            renewed_at = time.monotonic()
            while not self._stopping.is_set():
                connection.process_data_events(time_limit=min(0.2, renew_every_s or 0.2))
                if self._batch:
                    self._handle_batch(channel)
                if self._cancelled_by_broker:
                    raise _Reconnect("consumer cancelled by the broker")
                if renew_every_s is not None and time.monotonic() - renewed_at >= renew_every_s:
                    self._declare_side_queues(channel)
                    renewed_at = time.monotonic()
        finally:
            self._consuming.clear()
            self._publish_channel = None
            self._batch = []  # unacked: the broker redelivers them
            if connection.is_open:
                try:
                    # Unacked deliveries not yet handled go back to the queue.
                    connection.close()
                except pika.exceptions.AMQPError:
                    pass

    def _on_cancelled_by_broker(self, _frame) -> None:
        self._cancelled_by_broker = True

    # -- one delivery ---------------------------------------------------------------------------------

    def _on_message(self, channel: BlockingChannel, method, properties, body: bytes) -> None:
        if self._stopping.is_set():
            return  # left unacked: requeued when the connection closes
        if self._batch_handler is not None:
            self._batch.append((method, properties, body))
            return
        self._handle_one(channel, method, properties, body)

    def _handle_batch(self, channel: BlockingChannel) -> None:
        """Handle the deliveries of one pump together (see the class docstring)."""
        batch, self._batch = self._batch, []
        if self._stopping.is_set():
            return  # left unacked: requeued when the connection closes
        decoded: list[tuple[tuple, Envelope]] = []
        one_by_one: list[tuple] = []
        for delivery in batch:
            try:
                envelope = decode_envelope(delivery[2])
            except MalformedEvent:
                one_by_one.append(delivery)  # parked there
                continue
            if any(e.event_id == envelope.event_id for _, e in decoded):
                one_by_one.append(delivery)  # a repeat within the batch: found processed there
            else:
                decoded.append((delivery, envelope))
        seen = self._processed.seen_among([e.event_id for _, e in decoded]) if self._processed else set()
        fresh = [(d, e) for d, e in decoded if e.event_id not in seen]
        for delivery, envelope in decoded:
            if envelope.event_id in seen:
                logger.info("event already processed; skipped", extra=_log_extra(envelope, queue=self.queue))
                channel.basic_ack(delivery[0].delivery_tag)
        done: set[str] = set()
        if fresh:
            try:
                left = {e.event_id for e in self._batch_handler([e for _, e in fresh])}
                done = {e.event_id for _, e in fresh} - left
            except Exception as exc:  # every event of the batch gets its own chance below
                logger.warning("batch failed (%s); handling its events one by one", failure_summary(exc),
                               extra={"queue": self.queue, "error_type": type(exc).__name__, "count": len(fresh)})
            if done and self._processed is not None:
                self._processed.record_all(sorted(done))
        for delivery, envelope in fresh:
            if envelope.event_id in done:
                channel.basic_ack(delivery[0].delivery_tag)
            else:
                one_by_one.append(delivery)
        for method, properties, body in sorted(one_by_one, key=lambda d: d[0].delivery_tag):
            if self._stopping.is_set():
                return
            self._handle_one(channel, method, properties, body)

    def _handle_one(self, channel: BlockingChannel, method, properties, body: bytes) -> None:
        headers = dict(properties.headers or {})
        retries = _int_header(headers.get(HEADER_RETRY_COUNT))
        try:
            envelope = decode_envelope(body)
        except MalformedEvent as exc:
            logger.warning("malformed message parked", extra={"queue": self.queue, "error_type": "MalformedEvent"})
            self._park(properties, body, exc, exc.reason, retries)
            channel.basic_ack(method.delivery_tag)
            return
        extra = _log_extra(envelope, queue=self.queue, attempt=retries + 1)
        try:
            if self._processed is not None and self._processed.seen(envelope.event_id):
                logger.info("event already processed; skipped", extra=extra)
            else:
                with event_context(envelope):  # the handler's logs and outgoing calls carry the event's ids
                    self._handler(envelope)
                if self._processed is not None:
                    self._processed.record(envelope.event_id)
        except PermanentError as exc:
            logger.warning("event failed permanently; parked", extra={**extra, "error_type": _type_name(exc)})
            self._park(properties, body, exc, exc.reason, retries)
        except Exception as exc:  # any handler failure is retried, never dropped
            extra["error_type"] = type(exc).__name__
            if retries >= self.max_retries:
                logger.error("event failed (%s) after %d retries; parked", failure_summary(exc), retries, extra=extra)
                self._park(properties, body, exc, f"failed after {retries} retries", retries)
            else:
                logger.warning("event failed (%s); will retry", failure_summary(exc), extra=extra)
                self._retry(properties, body, retries + 1)
        channel.basic_ack(method.delivery_tag)

    def _retry(self, properties, body: bytes, retry_count: int) -> None:
        headers = _clean_headers(properties.headers)
        headers[HEADER_RETRY_COUNT] = retry_count
        self._republish(self.retry_queue, properties, body, headers)

    def _park(self, properties, body: bytes, exc: BaseException, reason: str, retries: int) -> None:
        headers = _clean_headers(properties.headers)
        headers.update({
            HEADER_RETRY_COUNT: retries,
            HEADER_ERROR_TYPE: _type_name(exc),
            HEADER_ERROR_REASON: reason[:200],
            HEADER_PARKED_AT: now_ms(),
            HEADER_PARKED_BY: self.queue,
        })
        self._republish(self.parking_queue, properties, body, headers)

    def _republish(self, queue: str, properties, body: bytes, headers: dict) -> None:
        republished = pika.BasicProperties(
            content_type=properties.content_type,
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=properties.message_id,
            type=properties.type,
            correlation_id=properties.correlation_id,
            timestamp=properties.timestamp,
            app_id=properties.app_id,
            headers=headers,
        )
        channel = self._publish_channel
        if channel is None:
            raise _Reconnect("no publishing channel")
        try:
            channel.basic_publish("", queue, body, republished, mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            # Not durably stored elsewhere: do not ack; drop the connection so it is redelivered.
            raise _Reconnect(f"republish to {queue} not confirmed") from exc


def _clean_headers(headers: dict | None) -> dict:
    return {k: v for k, v in (headers or {}).items() if k not in _BROKER_HEADERS}


def _int_header(value: object) -> int:
    try:
        return max(0, int(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
