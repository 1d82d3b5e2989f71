"""The event bus against the real broker: delivery, retries, parking, idempotency, reconnection."""

from __future__ import annotations

import threading

import pika
import pytest

from clinic.inbox.v1.inbox_pb2 import MessageDelivered
from services.kit.bus import (
    HEADER_ERROR_REASON,
    HEADER_ERROR_TYPE,
    HEADER_RETRY_COUNT,
    BatchPublisher,
    PermanentError,
    Publisher,
    PublishError,
    Topology,
)
from services.kit.events import decode_envelope, new_envelope, unpack
from services.kit.logs import correlation_id_var, event_id_var
from services.kit.processed_events import ProcessedEvents
from tests.waits import wait_until

DELIVERED = "message.delivered.v1"


def delivered(message_id: str = "m-1", **fields) -> object:
    payload = MessageDelivered(message_id=message_id, agency_id="agency-1", recipient_staff_id="staff-9", **fields)
    return new_envelope(DELIVERED, payload, agency_id="agency-1", producer="inbox", correlation_id="corr-1")


class Recorder:
    """A handler that records envelopes and can be told to fail."""

    def __init__(self, fail_with: BaseException | None = None):
        self.calls: list = []
        self.fail_with = fail_with
        self._lock = threading.Lock()

    def __call__(self, envelope) -> None:
        with self._lock:
            self.calls.append(envelope)
        if self.fail_with is not None:
            raise self.fail_with

    def ids(self) -> list[str]:
        with self._lock:
            return [envelope.event_id for envelope in self.calls]


def test_confirmed_event_reaches_subscriber_with_payload_intact(event_bus):
    handler = Recorder()
    consumer = event_bus.consumer("inbox-watch", [DELIVERED], handler)
    event = delivered("m-42", team_ids=["t1", "t2"])
    publisher = Publisher(event_bus.amqp_url, event_bus.topology)
    with consumer.running():
        publisher.publish([event])
        wait_until(lambda: handler.calls)
    publisher.close()

    received = handler.calls[0]
    assert received.event_id == event.event_id
    assert received.correlation_id == "corr-1"
    assert received.producer == "inbox"
    payload = unpack(received, MessageDelivered)
    assert payload.message_id == "m-42"
    assert list(payload.team_ids) == ["t1", "t2"]
    assert event_bus.message_count(consumer.queue) == 0


def test_the_handler_runs_with_the_events_correlation_and_event_ids(event_bus):
    seen = []

    def handler(envelope):
        seen.append((correlation_id_var.get(), event_id_var.get()))

    consumer = event_bus.consumer("ids", [DELIVERED], handler)
    event = delivered()
    with consumer.running():
        Publisher(event_bus.amqp_url, event_bus.topology).publish([event])
        wait_until(lambda: seen)
    assert seen == [("corr-1", event.event_id)]  # its logs and outgoing calls carry them
    assert correlation_id_var.get() is None and event_id_var.get() is None


def test_message_properties_carry_ids_and_no_payload(event_bus):
    consumer = event_bus.consumer("props", [DELIVERED], Recorder())
    with consumer.running():
        consumer.stop()
    event = delivered()
    Publisher(event_bus.amqp_url, event_bus.topology).publish([event])
    properties, body = event_bus.get(consumer.queue)
    assert properties.message_id == event.event_id
    assert properties.type == DELIVERED
    assert properties.delivery_mode == 2
    assert properties.content_type == "application/x-protobuf"
    assert properties.correlation_id == "corr-1"
    assert properties.headers == {
        "x-producer": "inbox",
        "x-agency-id": "agency-1",
        "x-signer": "inbox",  # signed by the producer it names (services.kit.bus.signing)
        "x-signature": properties.headers["x-signature"],
    }
    assert decode_envelope(body) == event


def test_failing_handler_is_parked_after_exactly_max_retries(event_bus):
    handler = Recorder(fail_with=RuntimeError("could not deliver to Jane Doe"))
    consumer = event_bus.consumer("always-fails", [DELIVERED], handler, max_retries=3)
    event = delivered()
    with consumer.running():
        Publisher(event_bus.amqp_url, event_bus.topology).publish([event])
        properties, body = event_bus.get(consumer.parking_queue)

    assert handler.ids() == [event.event_id] * 4  # the first attempt and 3 retries
    assert decode_envelope(body).event_id == event.event_id
    headers = properties.headers
    assert headers[HEADER_RETRY_COUNT] == 3
    assert headers[HEADER_ERROR_TYPE] == "RuntimeError"
    assert headers[HEADER_ERROR_REASON] == "failed after 3 retries"
    assert "Jane" not in repr(headers)  # the exception text never leaves the process
    assert "x-death" not in headers
    assert event_bus.message_count(consumer.retry_queue) == 0
    assert event_bus.message_count(consumer.queue) == 0


def test_handler_that_recovers_on_a_retry_is_not_parked(event_bus):
    attempts = []

    def flaky(envelope):
        attempts.append(envelope.event_id)
        if len(attempts) < 3:
            raise ConnectionError("downstream busy")

    consumer = event_bus.consumer("recovers", [DELIVERED], flaky, max_retries=5)
    with consumer.running():
        Publisher(event_bus.amqp_url, event_bus.topology).publish([delivered()])
        wait_until(lambda: len(attempts) == 3)
    assert event_bus.message_count(consumer.parking_queue) == 0


def test_permanent_error_goes_straight_to_parking(event_bus):
    handler = Recorder(fail_with=PermanentError("unknown_recipient"))
    consumer = event_bus.consumer("permanent", [DELIVERED], handler)
    with consumer.running():
        Publisher(event_bus.amqp_url, event_bus.topology).publish([delivered()])
        properties, _ = event_bus.get(consumer.parking_queue)

    assert len(handler.calls) == 1
    assert properties.headers[HEADER_RETRY_COUNT] == 0
    assert properties.headers[HEADER_ERROR_TYPE] == "services.kit.events.PermanentError"
    assert properties.headers[HEADER_ERROR_REASON] == "unknown_recipient"


def test_same_event_delivered_twice_has_its_effect_once(event_bus, mongo_client, db_name):
    effects: list[str] = []
    handler = Recorder()

    def deliver(envelope):
        handler(envelope)
        effects.append(envelope.event_id)

    processed = ProcessedEvents(mongo_client[db_name], "board-writer")
    consumer = event_bus.consumer("dedupe", [DELIVERED], deliver, processed=processed, prefetch=1)
    event, sentinel = delivered("m-1"), delivered("m-2")
    publisher = Publisher(event_bus.amqp_url, event_bus.topology)
    with consumer.running():
        publisher.publish([event, event, sentinel])
        wait_until(lambda: sentinel.event_id in effects)

    assert effects == [event.event_id, sentinel.event_id]
    assert processed.seen(event.event_id)
    stored = mongo_client[db_name][ProcessedEvents.COLLECTION].find_one({"_id": f"board-writer:{event.event_id}"})
    assert isinstance(stored["processed_at"], int)


def test_consumer_survives_a_broker_connection_drop(event_bus, name_prefix):
    handler = Recorder()
    connection_name = f"{name_prefix}-consumer"
    consumer = event_bus.consumer("survivor", [DELIVERED], handler, connection_name=connection_name)
    publisher = Publisher(event_bus.amqp_url, event_bus.topology)
    before, after = delivered("m-before"), delivered("m-after")
    with consumer.running():
        publisher.publish([before])
        wait_until(lambda: before.event_id in handler.ids())

        assert event_bus.close_connections_named(connection_name) == 1
        publisher.publish([after])
        wait_until(lambda: after.event_id in handler.ids(), timeout=20)
        assert consumer.sessions == 2  # it reconnected rather than carrying on by chance
    assert handler.ids().count(before.event_id) == 1


def test_event_nobody_subscribes_to_is_kept_in_unrouted(event_bus):
    event = new_envelope("lab_result.received.v1", MessageDelivered(), agency_id="agency-1", producer="notifications")
    Publisher(event_bus.amqp_url, event_bus.topology).publish([event])
    properties, body = event_bus.get(event_bus.topology.unrouted_name)
    assert properties.message_id == event.event_id
    assert decode_envelope(body).event_type == "lab_result.received.v1"


def test_publish_to_a_missing_exchange_raises_publish_error(event_bus):
    missing = Topology(exchange="no-such-exchange", prefix=event_bus.topology.prefix)
    publisher = Publisher(event_bus.amqp_url, missing, declare_topology=False)
    with pytest.raises(PublishError):
        publisher.publish([delivered()])
    # The publisher recovers for the next call rather than staying broken: once the exchange
    # exists, the same publisher delivers.
    connection = pika.BlockingConnection(pika.URLParameters(event_bus.amqp_url))
    try:
        missing.declare(connection.channel())
        publisher.publish([delivered()])
        properties, _body = event_bus.get(missing.unrouted_name)
        assert properties.type == DELIVERED
    finally:
        channel = connection.channel()
        channel.exchange_delete(missing.exchange_name)
        channel.exchange_delete(missing.unrouted_name)
        channel.queue_delete(missing.unrouted_name)
        connection.close()
        publisher.close()


def test_malformed_bytes_are_parked_and_the_consumer_keeps_serving(event_bus):
    handler = Recorder()
    consumer = event_bus.consumer("sturdy", [DELIVERED], handler)
    good = delivered()
    with consumer.running():
        event_bus.publish_raw(DELIVERED, b"\xff\x00 definitely not an envelope")
        Publisher(event_bus.amqp_url, event_bus.topology).publish([good])
        wait_until(lambda: good.event_id in handler.ids())
        properties, body = event_bus.get(consumer.parking_queue)

    assert body == b"\xff\x00 definitely not an envelope"
    assert properties.headers[HEADER_ERROR_TYPE] == "services.kit.events.MalformedEvent"
    assert properties.headers[HEADER_ERROR_REASON] == "body is not a protobuf envelope"
    assert handler.ids() == [good.event_id]


def test_stop_lets_the_in_flight_message_finish(event_bus):
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slow(envelope):
        started.set()
        release.wait(10)
        finished.set()

    consumer = event_bus.consumer("graceful", [DELIVERED], slow)
    thread = consumer.start()
    assert consumer.wait_until_consuming(10)
    Publisher(event_bus.amqp_url, event_bus.topology).publish([delivered()])
    assert started.wait(10)
    consumer.stop()
    release.set()
    thread.join(10)
    assert not thread.is_alive()
    assert finished.is_set()
    assert event_bus.message_count(consumer.queue) == 0  # acked, not requeued


def test_batch_publisher_confirms_all_and_leaves_out_returned_events(event_bus):
    subscriber = event_bus.consumer("batch", [DELIVERED], Recorder())
    with subscriber.running():
        subscriber.stop()
    publisher = BatchPublisher(event_bus.amqp_url, event_bus.topology)
    batch = [delivered(f"m-{i}") for i in range(300)]
    assert publisher.publish_batch(batch) == {event.event_id for event in batch}
    assert event_bus.message_count(subscriber.queue) == 300

    # With its queue gone the alternate exchange routes nowhere: the broker returns the event.
    connection = pika.BlockingConnection(pika.URLParameters(event_bus.amqp_url))
    connection.channel().queue_delete(event_bus.topology.unrouted_name)
    connection.close()
    unroutable = new_envelope("nobody.listens.v1", MessageDelivered(), agency_id="a", producer="inbox")
    routable = delivered("m-last")
    assert publisher.publish_batch([unroutable, routable]) == {routable.event_id}
    publisher.close()


def test_batch_publisher_to_a_missing_exchange_confirms_nothing(event_bus):
    missing = Topology(exchange="no-such-exchange", prefix=event_bus.topology.prefix)
    publisher = BatchPublisher(event_bus.amqp_url, missing, declare_topology=False, confirm_timeout_s=5)
    assert publisher.publish_batch([delivered(), delivered("m-2")]) == set()
    publisher.close()


def test_publishers_reconnect_after_a_broker_connection_drop(event_bus, name_prefix):
    subscriber = event_bus.consumer("after-drop", [DELIVERED], Recorder())
    with subscriber.running():
        subscriber.stop()
    name = f"{name_prefix}-publishers"
    single = Publisher(event_bus.amqp_url, event_bus.topology, connection_name=name)
    batch = BatchPublisher(event_bus.amqp_url, event_bus.topology, connection_name=name)
    single.publish([delivered("m-1")])
    assert len(batch.publish_batch([delivered("m-2")])) == 1

    assert event_bus.close_connections_named(name) == 2
    single.publish([delivered("m-3")])
    after = [delivered(f"m-{i}") for i in range(4, 54)]
    assert batch.publish_batch(after) == {event.event_id for event in after}
    assert event_bus.message_count(subscriber.queue) == 53
    single.close()
    batch.close()


# --- batches ------------------------------------------------------------------------------------


class BatchRecorder:
    """A batch handler that records what it was given and hands back the events `leave` picks."""

    def __init__(self, leave=lambda envelope: False, fail_with: BaseException | None = None):
        self.batches: list[list[str]] = []
        self.leave, self.fail_with = leave, fail_with
        self._lock = threading.Lock()

    def __call__(self, envelopes):
        with self._lock:
            self.batches.append([envelope.event_id for envelope in envelopes])
        if self.fail_with is not None:
            raise self.fail_with
        return [envelope for envelope in envelopes if self.leave(envelope)]

    def ids(self) -> list[str]:
        with self._lock:
            return [event_id for batch in self.batches for event_id in batch]


def queued_then_consumed(event_bus, consumer, events):
    """Declare the consumer's queues, queue `events` while it is stopped, then run it: the events are
    waiting together when it starts."""
    with consumer.running():
        pass
    publisher = Publisher(event_bus.amqp_url, event_bus.topology)
    publisher.publish(events)
    publisher.close()
    return consumer.running()


def test_a_batch_handler_takes_the_events_that_arrived_together(event_bus, mongo_client, db_name):
    single, batch = Recorder(), BatchRecorder()
    processed = ProcessedEvents(mongo_client[db_name], "batch-writer")
    consumer = event_bus.consumer("batches", [DELIVERED], single, processed=processed, batch_handler=batch)
    events = [delivered(f"m-{n}") for n in range(6)]
    with queued_then_consumed(event_bus, consumer, events):
        wait_until(lambda: len(batch.ids()) == 6)
        wait_until(lambda: event_bus.message_count(consumer.queue) == 0)
    assert sorted(batch.ids()) == sorted(e.event_id for e in events) and single.calls == []
    assert processed.seen_among([e.event_id for e in events]) == {e.event_id for e in events}
    assert len(batch.batches) < 6  # waiting together, they were handled together


def test_events_a_batch_leaves_go_one_by_one_with_retries_and_parking(event_bus, mongo_client, db_name):
    single = Recorder(fail_with=PermanentError("unknown_recipient"))
    batch = BatchRecorder(leave=lambda e: unpack(e, MessageDelivered).message_id == "m-bad")
    processed = ProcessedEvents(mongo_client[db_name], "batch-leaves")
    consumer = event_bus.consumer("leaves", [DELIVERED], single, processed=processed, batch_handler=batch)
    good, bad = delivered("m-good"), delivered("m-bad")
    with queued_then_consumed(event_bus, consumer, [good, bad]):
        properties, body = event_bus.get(consumer.parking_queue)
    assert decode_envelope(body).event_id == bad.event_id
    assert properties.headers[HEADER_ERROR_REASON] == "unknown_recipient"
    assert single.ids() == [bad.event_id]
    assert processed.seen_among([good.event_id, bad.event_id]) == {good.event_id}


def test_a_failed_batch_is_handled_one_by_one(event_bus, mongo_client, db_name):
    single, batch = Recorder(), BatchRecorder(fail_with=RuntimeError("database gone"))
    processed = ProcessedEvents(mongo_client[db_name], "batch-fails")
    consumer = event_bus.consumer("fails", [DELIVERED], single, processed=processed, batch_handler=batch)
    events = [delivered(f"m-{n}") for n in range(3)]
    with queued_then_consumed(event_bus, consumer, events):
        wait_until(lambda: len(single.calls) == 3)
        wait_until(lambda: event_bus.message_count(consumer.queue) == 0)
    assert sorted(single.ids()) == sorted(batch.ids()) == sorted(e.event_id for e in events)
    assert processed.seen_among([e.event_id for e in events]) == {e.event_id for e in events}
    assert event_bus.message_count(consumer.parking_queue) == 0


def test_a_batch_leaves_out_processed_events_and_repeats_within_it(event_bus, mongo_client, db_name):
    single, batch = Recorder(), BatchRecorder()
    processed = ProcessedEvents(mongo_client[db_name], "batch-dedupe")
    consumer = event_bus.consumer("dedupe-batch", [DELIVERED], single, processed=processed, batch_handler=batch)
    done, repeated, fresh = delivered("m-done"), delivered("m-twice"), delivered("m-new")
    processed.record(done.event_id)
    with queued_then_consumed(event_bus, consumer, [done, repeated, repeated, fresh]):
        wait_until(lambda: event_bus.message_count(consumer.queue) == 0 and fresh.event_id in batch.ids())
    assert sorted(batch.ids()) == sorted([repeated.event_id, fresh.event_id])
    assert single.calls == []  # the second copy was found processed
