"""Each service on its own broker user (services.kit.bus.users, docs/bus-security.md), attacked with
inbox's credentials as the stack gave them to inbox: the audit queue cannot be read, consumed, purged,
deleted, bound to or written into by name; an event type inbox does not publish, and a user_id that is
not inbox's, are refused by the broker; only the audit user consumes the audit queue; and the stack
works on these users (a message and a lab result are delivered, and their reads audited)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pika
import pika.exceptions
import pytest
from hl7.client import MLLPClient

from clinic.inbox.v1 import inbox_pb2
from services.kit.bus import users
from services.kit.bus.messages import message_properties
from services.kit.bus.signing import development_keyring
from services.kit.events import new_envelope
from tests.e2e.lab_messages import oru
from tests.waits import wait_until

AUDIT_QUEUE = "audit.records"
EXCHANGE = "clinic.events"
ACCESS_REFUSED = 403
PRECONDITION_FAILED = 406


@pytest.fixture(scope="module")
def vhost(stack) -> str:
    return users.vhost_of(stack.config.amqp_url)


@pytest.fixture(scope="module")
def inbox_url(stack, vhost) -> str:
    url = stack.amqp_url_of("inbox")
    assert pika.URLParameters(url).credentials.username == stack.broker_user("inbox")
    return url


@contextmanager
def channel_as(url: str) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        yield channel
    finally:
        if connection.is_open:
            connection.close()


def refused(url: str, action: Callable, code: int = ACCESS_REFUSED) -> str:
    """Run `action(channel)` as `url`'s user; the broker must close the channel with `code`. Returns its text."""
    with channel_as(url) as channel, pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
        action(channel)
    assert closed.value.reply_code == code, closed.value
    return closed.value.reply_text


def rabbitmqctl(*args: str) -> list[list[str]]:
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "--no-table-headers", *args], check=True, capture_output=True, text=True, timeout=60
    )
    return [line.split("\t") for line in listed.stdout.splitlines() if line.strip()]


def consumer_users(vhost: str, queue: str) -> set[str]:
    """The broker users of the consumers of `queue`."""
    channels = {row[0]: row[1] for row in rabbitmqctl("list_channels", "pid", "user")}
    return {
        channels.get(row[1], "?")
        for row in rabbitmqctl("list_consumers", "-p", vhost, "queue_name", "channel_pid")
        if row[0] == queue
    }


def only_audit_consumes(stack, vhost: str) -> bool:
    """The audit queue's consumers are this stack's audit service (and any other stack's on the vhost)."""
    consumers = consumer_users(vhost, AUDIT_QUEUE)
    return stack.broker_user("audit") in consumers and {u.rsplit(".", 1)[-1] for u in consumers} == {"audit"}


def audit_queue_exists(admin_url: str) -> int:
    with channel_as(admin_url) as channel:
        return channel.queue_declare(AUDIT_QUEUE, passive=True).method.consumer_count


def test_every_service_connects_as_its_own_user_and_only_audit_consumes_the_audit_queue(stack, vhost):
    for service in users.SERVICES:
        assert pika.URLParameters(stack.amqp_url_of(service)).credentials.username == stack.broker_user(service)
    # The services' connections on the vhost are theirs (the launcher's admin user serves no process).
    connected = {row[0] for row in rabbitmqctl("list_connections", "user", "vhost") if row[1] == vhost}
    own = {stack.broker_user(s) for s in ("inbox", "audit", "auto-reply", "web", "notifications")}
    assert own <= connected, connected
    assert only_audit_consumes(stack, vhost), consumer_users(vhost, AUDIT_QUEUE)
    assert stack.broker_user("inbox") in consumer_users(vhost, "inbox.board-item-deliveries")


def test_inbox_can_neither_read_nor_consume_the_audit_queue(stack, inbox_url):
    text = refused(inbox_url, lambda ch: ch.basic_get(AUDIT_QUEUE))
    assert f"queue '{AUDIT_QUEUE}'" in text and stack.broker_user("inbox") in text
    refused(inbox_url, lambda ch: ch.basic_consume(AUDIT_QUEUE, lambda *_: None))


def test_inbox_can_neither_purge_nor_delete_the_audit_queue(stack, inbox_url, vhost):
    refused(inbox_url, lambda ch: ch.queue_purge(AUDIT_QUEUE))
    # if_unused: were it allowed, the broker would still keep the queue (the audit service consumes it).
    refused(inbox_url, lambda ch: ch.queue_delete(AUDIT_QUEUE, if_unused=True))
    assert audit_queue_exists(stack.config.amqp_url) >= 1
    assert only_audit_consumes(stack, vhost)


def test_inbox_cannot_bind_a_queue_of_its_own_to_the_audit_stream(inbox_url):
    queue = f"inbox.eavesdrop-{uuid.uuid4().hex[:8]}"
    with channel_as(inbox_url) as channel:
        channel.queue_declare(queue, auto_delete=True)  # its own name space: allowed
        channel.queue_bind(queue, EXCHANGE, routing_key="board_item.delivery_requested.v1")  # its subscription
    for routing_key in ("phi.accessed.v1", "security_event.recorded.v1", "#", "*.accessed.v1"):
        text = refused(inbox_url, lambda ch, key=routing_key: ch.queue_bind(queue, EXCHANGE, routing_key=key))
        assert f"topic '{routing_key}'" in text
    with channel_as(inbox_url) as channel:
        channel.queue_delete(queue)


def test_inbox_cannot_write_into_the_audit_queue_by_its_name(inbox_url):
    text = refused(inbox_url, lambda ch: ch.basic_publish("", AUDIT_QUEUE, b"forged"))
    assert "exchange 'amq.default'" in text
    refused(inbox_url, lambda ch: ch.basic_publish("amq.direct", AUDIT_QUEUE, b"forged"))
    # Nor through the broker's dead-lettering: a queue of its own that would dead-letter by name.
    refused(
        inbox_url,
        lambda ch: ch.queue_declare(
            f"inbox.relay-{uuid.uuid4().hex[:8]}",
            auto_delete=True,
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": AUDIT_QUEUE},
        ),
    )


def signed_envelope(stack, event_type: str, producer: str):
    request = inbox_pb2.DeliverItemRequest(
        kind=inbox_pb2.DELIVERED_KIND_LAB,
        title="forged",
        source="lab",
        source_ref=f"forged-{uuid.uuid4().hex[:8]}",
        recipients=inbox_pb2.Recipients(whole_agency=True),
    )
    envelope = new_envelope(event_type, request, agency_id="agy_riverbend", producer=producer)
    body = envelope.SerializeToString()
    return envelope, body, development_keyring(stack.run_dir).signer.headers(event_type, body, producer)


def test_the_broker_refuses_event_types_inbox_does_not_publish(stack, inbox_url):
    """A delivery request (notifications' to make, and the forged "call patient" of the finding), or a
    session revocation (directory's): refused by the broker itself, whatever the message says."""
    for event_type, producer in (
        ("board_item.delivery_requested.v1", "notifications"),
        ("session.revoked.v1", "directory"),
    ):
        envelope, body, signature = signed_envelope(stack, event_type, producer)
        text = refused(
            inbox_url,
            lambda ch, e=envelope, b=body, s=signature: ch.basic_publish(
                EXCHANGE, e.event_type, b, message_properties(e, s), mandatory=True
            ),
        )
        assert f"topic '{event_type}'" in text


def test_the_broker_refuses_a_user_id_that_is_not_the_publishers(stack, inbox_url, vhost):
    envelope, body, signature = signed_envelope(stack, "message.delivered.v1", "inbox")
    notifications = stack.broker_user("notifications")
    text = refused(
        inbox_url,
        lambda ch: ch.basic_publish(
            EXCHANGE, envelope.event_type, body, message_properties(envelope, signature, notifications)
        ),
        PRECONDITION_FAILED,
    )
    assert "user_id" in text


def test_the_audit_user_consumes_its_queue(stack, vhost):
    with channel_as(stack.amqp_url_of("audit")) as channel:
        channel.basic_qos(prefetch_count=1)
        tag = channel.basic_consume(AUDIT_QUEUE, lambda *_: None)  # unacked: back to the queue on close
        assert only_audit_consumes(stack, vhost)
        channel.basic_cancel(tag)


def lab_item(client, mrn: str):
    return next(
        (
            i
            for i in client.items(folder="lab", limit=100)["items"]
            if i.get("summary", "").startswith(f"Patient {mrn}:")
        ),
        None,
    )


def audited(admin, actor_id: str, resource_type: str, resource_id: str) -> dict | None:
    reply = admin.get("/api/v1/audit/records", params={"actor": actor_id, "resource_type": resource_type})
    assert reply.status_code == 200, reply.text
    return next((r for r in reply.json()["items"] if r["resource_id"] == resource_id), None)


def test_the_stack_works_on_its_own_users(stack, vhost, admin, reyes, kim):
    """A message and a lab result reach their boards; reading each is in the audit trail; and what inbox
    publishes carries its own broker user as user_id."""
    with channel_as(stack.config.amqp_url) as listening:
        heard = listening.queue_declare("", exclusive=True).method.queue
        listening.queue_bind(heard, EXCHANGE, routing_key="message.delivered.v1")
        sent = reyes.send(to_staff_ids=[kim.staff_id], subject=f"Broker users {uuid.uuid4().hex[:6]}")
        assert sent.status_code == 201, sent.text
        message_id = sent.json()["id"]

        def delivered():
            method, properties, _body = listening.basic_get(heard, auto_ack=True)
            return properties if method is not None else None

        assert wait_until(delivered, timeout=20, message="message.delivered.v1").user_id == stack.broker_user("inbox")
    assert kim.get(f"/api/v1/messages/{message_id}").status_code == 200
    wait_until(lambda: audited(admin, kim.staff_id, "message", message_id), timeout=20, message="the read, audited")

    mrn = "MRN-" + uuid.uuid4().hex[:8]
    with MLLPClient("127.0.0.1", stack.config.ports.notifications_mllp) as mllp:
        raw = mllp.send_message(oru(patient=mrn))
    assert b"MSA|AA" in raw, raw
    item = wait_until(lambda: lab_item(kim, mrn), timeout=20, message="the lab result on Nurse Kim's board")
    detail = kim.get(f"/api/v1/board/items/{item['id']}")
    assert detail.status_code == 200, detail.text
    order_id = detail.json()["source_ref"]
    assert kim.get(f"/api/v1/lab/results/{order_id}").status_code == 200
    record = wait_until(
        lambda: audited(admin, kim.staff_id, "lab_result", order_id), timeout=20, message="the lab read, audited"
    )
    assert record["service"] == "notifications"
