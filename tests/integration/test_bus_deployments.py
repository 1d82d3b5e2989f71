"""Two deployments on one vhost never silently share a queue, and parked messages can be replayed:
against the real broker, in the session's private vhost (tests/conftest.py `amqp_url`)."""

from __future__ import annotations

import logging

import pytest

from clinic.inbox.v1.inbox_pb2 import MessageDelivered
from services.kit.bus import PermanentError, Publisher
from services.kit.bus.parking import list_parked, replay_parked
from services.kit.bus.topology import deployment_name
from services.kit.events import new_envelope
from tests.integration.test_bus import Recorder
from tests.waits import wait_until

DELIVERED = "message.delivered.v1"


def delivered(message_id: str):
    payload = MessageDelivered(message_id=message_id, agency_id="agency-1", recipient_staff_id="staff-9")
    return new_envelope(DELIVERED, payload, agency_id="agency-1", producer="inbox")


def consumer(event_bus, deployment: str, handler=None, **options):
    options.setdefault("reconnect_delay_s", (0.05, 0.2))
    return event_bus.consumer("shared", [DELIVERED], handler or Recorder(), deployment=deployment, **options)


def test_a_second_deployment_is_refused_while_the_first_consumes_and_takes_over_once_it_is_gone(event_bus, caplog):
    first, replica = consumer(event_bus, "copy-a"), consumer(event_bus, "copy-a")
    second_handler = Recorder()
    second = consumer(event_bus, "copy-b", second_handler)
    with first.running(), replica.running():  # replicas of one deployment share the queue
        with caplog.at_level(logging.ERROR, logger="services.kit.bus.consumer"):
            thread = second.start()
            try:
                wait_until(lambda: second.held_by == "copy-a", timeout=10, message="the second deployment refused")
                assert not second.consuming
                publisher = Publisher(event_bus.amqp_url, event_bus.topology)
                publisher.publish([delivered(f"m-{n}") for n in range(5)])
                publisher.close()
                wait_until(lambda: event_bus.message_count(first.queue) == 0, timeout=10)
                assert second_handler.calls == []  # none of copy-a's events went to copy-b
                assert any(getattr(r, "code", "") == "queue_held_by_another_deployment" for r in caplog.records), (
                    caplog.records
                )
            except BaseException:
                second.stop()
                raise
    # copy-a stopped (no consumer left): copy-b takes the queue over by itself.
    try:
        assert second.wait_until_consuming(15), "copy-b did not take over the queue"
        assert second.held_by is None
        # Now copy-a is the one refused.
        again = consumer(event_bus, "copy-a")
        again.start()
        try:
            wait_until(lambda: again.held_by == "copy-b", timeout=10, message="copy-a refused in turn")
            assert not again.consuming
        finally:
            again.stop()
    finally:
        second.stop()
        thread.join(10)


def test_unset_deployment_and_per_instance_queues_are_not_checked(event_bus):
    assert deployment_name(None) == "" and deployment_name(" copy-a ") == "copy-a"
    with pytest.raises(ValueError, match="CLINIC_DEPLOYMENT"):
        deployment_name("no spaces allowed")
    held = consumer(event_bus, "copy-a")
    unnamed = consumer(event_bus, "")
    with held.running(), unnamed.running():
        assert unnamed.consuming and unnamed.held_by is None


def test_parked_messages_are_listed_and_replayed_to_their_consumer(event_bus):
    failing = {"on": True}
    handled = Recorder()

    def handler(envelope):
        if failing["on"]:
            raise PermanentError("the recipient is unknown here")
        handled(envelope)

    worker = event_bus.consumer("replayed", [DELIVERED], handler)
    events = [delivered(f"p-{n}") for n in range(3)]
    publisher = Publisher(event_bus.amqp_url, event_bus.topology)
    with worker.running():
        publisher.publish(events)
        wait_until(lambda: event_bus.message_count(worker.parking_queue) == 3, timeout=10)
        parked = list_parked(event_bus.amqp_url, "replayed", event_bus.topology)
        assert {p.event_id for p in parked} == {e.event_id for e in events}
        assert all(p.reason == "the recipient is unknown here" and p.event_type == DELIVERED for p in parked)
        assert event_bus.message_count(worker.parking_queue) == 3  # listing leaves them parked

        failing["on"] = False  # the cause is fixed
        one = replay_parked(event_bus.amqp_url, "replayed", event_ids={events[0].event_id}, topology=event_bus.topology)
        assert one.replayed == [events[0].event_id] and one.left == 2
        wait_until(lambda: handled.ids() == [events[0].event_id], timeout=10)
        rest = replay_parked(event_bus.amqp_url, "replayed", topology=event_bus.topology)
        assert sorted(rest.replayed) == sorted(e.event_id for e in events[1:]) and rest.left == 0
        wait_until(lambda: sorted(handled.ids()) == sorted(e.event_id for e in events), timeout=10)
        assert event_bus.message_count(worker.parking_queue) == 0
    publisher.close()
