"""Consuming: `Consumer`, with manual acks, bounded retries, parking and an optional batch handler.

Processed-event idempotency is not the bus's: the consumer is given it (`processed=`, a
`services.kit.processed_events.ProcessedEvents`). pika is not thread-safe: a `Consumer` belongs to
the one thread that runs it.

Metrics (services.kit.metrics), by queue (a per-instance queue without its instance part): every
delivery finished, by outcome (handled, duplicate, retried, parked), and every parked one by reason
(malformed, a refusal's code, permanent_error, retries_exhausted). The depth of its three queues
and the consumers on the main one are sampled by the consumer itself every `depth_sample_s`
(15 s), with a passive queue.declare on a channel of its own: off any request path, one round
trip per queue.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from clinic.events.v1.envelope_pb2 import Envelope
from services.kit import metrics
from services.kit.bus import signing
from services.kit.bus.messages import (
    consume_span,
    event_context,
    log_extra,
    parking_headers,
    published_by,
    republished_properties,
    retries_of,
    retry_headers,
    type_name,
)
from services.kit.bus.topology import (
    ConsumerQueues,
    QueueHeldByAnotherDeployment,
    Topology,
    connection_parameters,
    deployment_name,
)
from services.kit.events import MalformedEvent, PermanentError, decode_envelope, failure_summary

if TYPE_CHECKING:
    from services.kit.processed_events import ProcessedEvents

__all__ = ["Consumer"]

logger = logging.getLogger(__name__)

DEPTH_SAMPLE_S = 15.0  # how often a consumer samples its queues' depth (a scrape reads the last sample)
# Why a message was parked, as counted (a refusal counts under its own code, services.kit.bus.signing).
PARK_MALFORMED = "malformed"
PARK_PERMANENT = "permanent_error"
PARK_RETRIES_EXHAUSTED = "retries_exhausted"


class _Reconnect(Exception):
    """Leave the current connection and start over (broker cancelled us, or a republish failed)."""


class Consumer:
    """Consumes a durable queue bound to routing keys with manual acks, bounded retries and parking.

    For each delivery: bytes that are not an envelope go to `<queue>.parking`; so does a message
    whose producer is not proven (services.kit.bus.signing: unsigned, signed by another producer
    than the envelope names, a bad signature, a producer that may not publish its event type, or
    an event type this queue is not bound to), parked with that reason, never handled nor retried,
    and reported to `on_refused` (default: the configured process's hook, which records an
    `event_refused` security event); an event already in `processed` is acked and skipped;
    otherwise `handler(envelope)` runs. On success the event id is recorded and the message
    acked. A PermanentError (MalformedEvent included) parks the event; any other exception
    republishes it (confirmed) to `<queue>.retry` with `x-retry-count` + 1, or parks it once
    `max_retries` retries have failed. The delivery is acked only after that republish was
    confirmed; if it cannot be, the connection is dropped and the broker redelivers the message.
    Retrying and parking keep the body and headers, so the signature of a good event stays valid.
    Both go through the consumer's own exchange `<queue>.republish` (never the default exchange,
    which a service's broker user may not write to: services.kit.bus.topology).

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
        producers: signing.ProducerKeys | None = None,
        on_refused: Callable[[signing.Refusal], None] | None = None,
        depth_sample_s: float = DEPTH_SAMPLE_S,
        deployment: str | None = None,
    ):
        if queue_expires_ms is not None and queue_expires_ms <= 0:
            raise ValueError("queue_expires_ms must be positive")
        self.topology = topology or Topology()
        self.queues = ConsumerQueues(
            self.topology, self.topology.name(queue), tuple(routing_keys), retry_delay_ms, queue_expires_ms
        )
        self.queue = self.queues.queue
        self.retry_queue = self.queues.retry_queue
        self.parking_queue = self.queues.parking_queue
        self.routing_keys = list(routing_keys)
        self.max_retries = max_retries
        self.retry_delay_ms = retry_delay_ms
        self.queue_expires_ms = queue_expires_ms
        self.metric_queue = metrics.queue_label(self.queue, per_instance=queue_expires_ms is not None)
        self._depth_sample_s = depth_sample_s
        self._sample_channel: BlockingChannel | None = None
        self._handler = handler
        self._batch_handler = batch_handler
        self._producers = producers or signing.current().producers
        self._on_refused = on_refused or signing.refusal_hook()
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
        # Which copy of the system this is (CLINIC_DEPLOYMENT): a shared queue another deployment's
        # consumers hold is not consumed (ConsumerQueues.claim). '' (unset): not checked.
        self.deployment = deployment_name(os.environ.get("CLINIC_DEPLOYMENT") if deployment is None else deployment)
        self.held_by: str | None = None  # the deployment holding the queue while this one is refused

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
        """Declare the exchange topology and this consumer's three queues (idempotent; needs
        configure permission on the shared exchange, which a service's own broker user lacks: the
        consumer itself declares with `ConsumerQueues.open`)."""
        self.queues.declare(channel)

    # -- one connection's life ----------------------------------------------------------------------

    def _consume_once(self) -> None:
        connection = pika.BlockingConnection(self._params)
        try:
            channel = self.queues.open(connection)
            self._claim(connection)
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
            sampled_at = None
            while not self._stopping.is_set():
                connection.process_data_events(time_limit=min(0.2, renew_every_s or 0.2))
                if self._batch:
                    self._handle_batch(channel)
                if self._cancelled_by_broker:
                    raise _Reconnect("consumer cancelled by the broker")
                if renew_every_s is not None and time.monotonic() - renewed_at >= renew_every_s:
                    self.queues.declare_side_queues(channel)
                    renewed_at = time.monotonic()
                if sampled_at is None or time.monotonic() - sampled_at >= self._depth_sample_s:
                    self.sample_depth(connection)
                    sampled_at = time.monotonic()
        finally:
            self._consuming.clear()
            self._publish_channel = None
            self._sample_channel = None
            self._batch = []  # unacked: the broker redelivers them
            if connection.is_open:
                try:
                    # Unacked deliveries not yet handled go back to the queue.
                    connection.close()
                except pika.exceptions.AMQPError:
                    pass

    def _claim(self, connection: pika.BlockingConnection) -> None:
        """Refuse to consume a shared queue another deployment's consumers hold (raises, so `run`
        tries again with its backoff and takes the queue over once they are gone). A per-instance
        queue (queue_expires_ms) is this process's alone and is not checked."""
        if not self.deployment or self.queue_expires_ms is not None:
            return
        try:
            previous = self.queues.claim(connection, self.deployment)
        except QueueHeldByAnotherDeployment as exc:
            self.held_by = exc.holder
            extra = {"queue": self.queue, "code": "queue_held_by_another_deployment", "count": exc.consumers}
            logger.error("queue held by another deployment (%s); not consuming", exc.holder, extra=extra)
            raise
        self.held_by = None
        if previous is not None:
            logger.warning("queue taken over from deployment %s (it had no consumer)", previous,
                           extra={"queue": self.queue})

    def _on_cancelled_by_broker(self, _frame) -> None:
        self._cancelled_by_broker = True

    def sample_depth(self, connection: pika.BlockingConnection) -> None:
        """Ready messages of the three queues and consumers of the main one, into the gauges. On a
        channel of its own: a queue that is gone (404) closes only that channel, reopened next time."""
        try:
            channel = self._sample_channel
            if channel is None or not channel.is_open:
                channel = self._sample_channel = connection.channel()
            for kind, queue in (("main", self.queue), ("retry", self.retry_queue), ("parking", self.parking_queue)):
                declared = channel.queue_declare(queue, passive=True).method
                metrics.queue_depth(self.metric_queue, kind, declared.message_count)
                if kind == "main":
                    metrics.queue_consumers(self.metric_queue, declared.consumer_count)
        except pika.exceptions.AMQPChannelError as exc:
            self._sample_channel = None
            logger.info("queue depth not sampled (%s)", type(exc).__name__, extra={"queue": self.queue})

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
            if self._refusal(delivery[0], delivery[1], delivery[2], envelope) is not None:
                one_by_one.append(delivery)  # refused there
                continue
            if any(e.event_id == envelope.event_id for _, e in decoded):
                one_by_one.append(delivery)  # a repeat within the batch: found processed there
            else:
                decoded.append((delivery, envelope))
        seen = self._processed.seen_among([e.event_id for _, e in decoded]) if self._processed else set()
        fresh = [(d, e) for d, e in decoded if e.event_id not in seen]
        for delivery, envelope in decoded:
            if envelope.event_id in seen:
                logger.info("event already processed; skipped", extra=log_extra(envelope, queue=self.queue))
                channel.basic_ack(delivery[0].delivery_tag)
                metrics.consumed(self.metric_queue, "duplicate")
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
                metrics.consumed(self.metric_queue, "handled")
            else:
                one_by_one.append(delivery)
        for method, properties, body in sorted(one_by_one, key=lambda d: d[0].delivery_tag):
            if self._stopping.is_set():
                return
            self._handle_one(channel, method, properties, body)

    def _handle_one(self, channel: BlockingChannel, method, properties, body: bytes) -> None:
        retries = retries_of(properties)
        try:
            envelope = decode_envelope(body)
        except MalformedEvent as exc:
            logger.warning("malformed message parked", extra={"queue": self.queue, "error_type": "MalformedEvent"})
            self._park(properties, body, exc, exc.reason, retries, kind=PARK_MALFORMED)
            channel.basic_ack(method.delivery_tag)
            return
        refusal = self._refusal(method, properties, body, envelope)
        if refusal is not None:
            self._refuse(properties, body, envelope, refusal, retries)
            channel.basic_ack(method.delivery_tag)
            return
        extra = log_extra(envelope, queue=self.queue, attempt=retries + 1)
        outcome = None  # counted once acked; retried and parked are counted where they happen
        traced = consume_span(envelope, properties, self.metric_queue)  # None while tracing is off
        try:
            if self._processed is not None and self._processed.seen(envelope.event_id):
                logger.info("event already processed; skipped", extra=extra)
                outcome = "duplicate"
            else:
                # The handler's logs and outgoing calls carry the event's ids (and its trace).
                with event_context(envelope, traced.trace_id if traced is not None else None):
                    self._handler(envelope)
                if self._processed is not None:
                    self._processed.record(envelope.event_id)
                outcome = "handled"
        except PermanentError as exc:
            logger.warning("event failed permanently; parked", extra={**extra, "error_type": type_name(exc)})
            self._park(properties, body, exc, exc.reason, retries, kind=PARK_PERMANENT)
        except Exception as exc:  # any handler failure is retried, never dropped
            extra["error_type"] = type(exc).__name__
            if retries >= self.max_retries:
                logger.error("event failed (%s) after %d retries; parked", failure_summary(exc), retries, extra=extra)
                reason = f"failed after {retries} retries"
                self._park(properties, body, exc, reason, retries, kind=PARK_RETRIES_EXHAUSTED)
            else:
                logger.warning("event failed (%s); will retry", failure_summary(exc), extra=extra)
                self._retry(properties, body, retries + 1)
        finally:
            if traced is not None:
                traced.finish(error=None if outcome is not None else "not handled", attributes={"attempt": retries + 1})
        channel.basic_ack(method.delivery_tag)
        if outcome is not None:
            metrics.consumed(self.metric_queue, outcome)

    def _refusal(self, method, properties, body: bytes, envelope: Envelope) -> str | None:
        """Why this message's producer is not proven, or None. A message from the exchange was routed
        by its routing key, which the signature covers; one that reached the queue otherwise (back
        from `.retry`, or published straight to the queue) is checked against its event type."""
        from_exchange = method.exchange == self.topology.exchange_name
        routing_key = method.routing_key if from_exchange else envelope.event_type
        reason = self._producers.refusal(
            routing_key, body, properties.headers, producer=envelope.producer, event_type=envelope.event_type
        )
        if reason is None and not any(signing.topic_matches(k, envelope.event_type) for k in self.routing_keys):
            reason = "unexpected_event_type"
        return reason

    def _refuse(self, properties, body: bytes, envelope: Envelope, reason: str, retries: int) -> None:
        """Park it with the reason and report it; nothing it claims is logged unless safely shaped."""
        refusal = signing.Refusal(
            reason=reason,
            queue=self.queue,
            event_id=envelope.event_id,
            event_type=signing.safe_type(envelope.event_type),
            agency_id=signing.safe_id(envelope.agency_id),
            producer=signing.safe_name(envelope.producer),
            signer=signing.safe_name(signing.header_text(properties.headers or {}, signing.HEADER_SIGNER)),
        )
        extra = {"queue": self.queue, "code": reason, "event_id": refusal.event_id, "event_type": refusal.event_type,
                 "broker_user": published_by(properties)}
        logger.warning("event refused: producer not proven; parked", extra=extra)
        self._park(properties, body, signing.EventRefused(reason), reason, retries, kind=reason)
        if self._on_refused is None:
            return
        try:
            self._on_refused(refusal)
        except Exception as exc:  # the message is parked already; a failed report must not undo that
            logger.error("refused event not reported (%s)", failure_summary(exc),
                         extra={**extra, "error_type": type(exc).__name__})

    def _retry(self, properties, body: bytes, retry_count: int) -> None:
        self._republish(self.retry_queue, properties, body, retry_headers(properties, retry_count))
        metrics.consumed(self.metric_queue, "retried")

    def _park(self, properties, body: bytes, exc: BaseException, reason: str, retries: int, *, kind: str) -> None:
        """To `.parking` with `reason` in its headers; counted by `kind`, a code from a fixed set."""
        headers = parking_headers(properties, exc, reason, retries, parked_by=self.queue)
        self._republish(self.parking_queue, properties, body, headers)
        metrics.parked(self.metric_queue, kind)

    def _republish(self, queue: str, properties, body: bytes, headers: dict) -> None:
        """To `queue` (retry or parking) through this consumer's own exchange, by the queue's name."""
        republished = republished_properties(properties, headers)
        channel = self._publish_channel
        if channel is None:
            raise _Reconnect("no publishing channel")
        try:
            channel.basic_publish(self.queues.republish_exchange, queue, body, republished, mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            # Not durably stored elsewhere: do not ack; drop the connection so it is redelivered.
            raise _Reconnect(f"republish to {queue} not confirmed") from exc
