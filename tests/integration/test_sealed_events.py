"""Events that carry PHI are sealed (services.kit.sealing): a delivery request's title and summary
are encrypted in the producer's outbox and on the broker, and inbox's delivery consumer opens them
(real broker, real database)."""

from __future__ import annotations

import pika
import pytest

from clinic.inbox.v1 import inbox_pb2
from services.inbox import domain
from services.inbox.board import ItemFilter
from services.inbox.delivery import Delivery
from services.kit.board_delivery import delivery_requested
from services.kit.bus import Publisher
from services.kit.events import MalformedEvent, decode_envelope, unpack
from services.kit.sealing import PayloadSealer
from services.kit.service_identity import IssuedToken, ServiceTokens
from tests.integration.inbox_fixtures import staff
from tests.waits import wait_until

AGENCY = "agy_1"
TITLE = "Critical potassium 6.9, call patient MRN 55501"


def _request(source_ref: str) -> inbox_pb2.DeliverItemRequest:
    return inbox_pb2.DeliverItemRequest(
        kind=inbox_pb2.DELIVERED_KIND_LAB, title=TITLE, summary="Maria Lopez, K 6.9",
        severity=inbox_pb2.SEVERITY_URGENT, recipients=inbox_pb2.Recipients(whole_agency=True), source="lab",
        source_ref=source_ref,
    )  # fmt: skip


def test_a_delivery_request_is_sealed_where_it_is_built():
    envelope = delivery_requested("notifications", AGENCY, _request("r-1"), "evt-sealed-1")
    wire = envelope.SerializeToString()
    assert envelope.payload_key_id
    assert b"potassium" not in wire and b"Lopez" not in wire and b"55501" not in wire
    assert unpack(envelope, inbox_pb2.DeliverItemRequest).title == TITLE
    with pytest.raises(MalformedEvent):  # another stack's master key does not open it
        unpack(envelope, inbox_pb2.DeliverItemRequest, PayloadSealer({"other": b"k" * 32}, "other"))


@pytest.fixture
def consuming(inbox, event_bus):
    components, table = inbox
    table.staff.update({"stf_a": AGENCY})
    components.service_tokens = ServiceTokens(
        "unused:1", "inbox", "secret", issuer=lambda client, secret, agency: IssuedToken(f"token-{agency}", 900)
    )
    feature = Delivery(components)
    feature.ensure_indexes()
    feature.attach()
    consumer = feature.consumer(event_bus.amqp_url, event_bus.topology, retry_delay_ms=50, max_retries=1)
    event_bus.queues += [consumer.queue, consumer.retry_queue, consumer.parking_queue]
    with consumer.running():
        yield components


def _next_body(channel, queue: str):
    method, _properties, body = channel.basic_get(queue, auto_ack=True)
    return body if method is not None else None


def test_the_broker_holds_ciphertext_and_inbox_delivers_the_clear_title(consuming, event_bus):
    components = consuming
    spy = event_bus.topology.prefix + "spy"
    connection = pika.BlockingConnection(pika.URLParameters(event_bus.amqp_url))
    try:
        channel = connection.channel()
        channel.queue_declare(spy, auto_delete=True)
        channel.queue_bind(spy, event_bus.topology.exchange_name, routing_key="board_item.delivery_requested.v1")
        publisher = Publisher(event_bus.amqp_url, event_bus.topology)
        publisher.publish([delivery_requested("notifications", AGENCY, _request("r-2"), "evt-sealed-2")])
        publisher.close()
        body = wait_until(lambda: _next_body(channel, spy), message="the delivery request on the spy queue")
    finally:
        connection.close()
    assert b"potassium" not in body and b"Lopez" not in body
    assert unpack(decode_envelope(body), inbox_pb2.DeliverItemRequest).summary == "Maria Lopez, K 6.9"

    items = wait_until(
        lambda: components.board.page(staff(AGENCY, "stf_a"), domain.FOLDER_LAB, ItemFilter(), None, 10)["items"]
    )
    assert items[0]["title"] == TITLE
