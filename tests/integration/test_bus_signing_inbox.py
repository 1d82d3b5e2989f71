"""Inbox's delivery consumer against forged delivery requests (real broker, real database): whoever
can publish to the exchange cannot put "critical potassium, call patient" on a board."""

from __future__ import annotations

import pika
import pytest

from clinic.audit.v1 import security_pb2
from clinic.inbox.v1 import inbox_pb2
from services.inbox import delivery as delivery_module
from services.inbox import domain
from services.inbox.board import ItemFilter
from services.inbox.delivery import Delivery
from services.kit.bus import HEADER_ERROR_REASON, HEADER_SIGNER, Publisher
from services.kit.bus import signing as bus_signing
from services.kit.events import decode_envelope, new_envelope, unpack
from services.kit.security_events import SecurityLog
from services.kit.service_identity import IssuedToken, ServiceTokens
from tests.integration.inbox_fixtures import staff
from tests.waits import wait_until

AGENCY = "agy_1"


@pytest.fixture
def consuming(inbox, event_bus):
    """Inbox's own delivery consumer (the process's keys: development ones here), reporting refusals
    to inbox's security log as `serve` makes it do."""
    components, table = inbox
    table.staff.update({"stf_a": AGENCY, "stf_b": AGENCY})
    components.service_tokens = ServiceTokens(
        "unused:1", "inbox", "secret", issuer=lambda client, secret, agency: IssuedToken(f"token-{agency}", 900)
    )
    feature = Delivery(components)
    feature.ensure_indexes()
    feature.attach()
    log = SecurityLog(components.store.db, service="inbox")
    consumer = feature.consumer(
        event_bus.amqp_url, event_bus.topology, retry_delay_ms=50, max_retries=1,
        on_refused=lambda refusal: bus_signing.record_refusal(log, refusal),
    )  # fmt: skip
    event_bus.queues += [consumer.queue, consumer.retry_queue, consumer.parking_queue]
    with consumer.running():
        yield components, consumer, log


def critical(source_ref: str, producer: str = "notifications"):
    request = inbox_pb2.DeliverItemRequest(
        kind=inbox_pb2.DELIVERED_KIND_LAB, title="Critical potassium, call patient", summary="K 6.8",
        severity=inbox_pb2.SEVERITY_URGENT, recipients=inbox_pb2.Recipients(whole_agency=True), source="lab",
        source_ref=source_ref,
    )  # fmt: skip
    return new_envelope(delivery_module.REQUESTED_EVENT, request, agency_id=AGENCY, producer=producer)


def publish_raw(event_bus, envelope, headers: dict | None) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(event_bus.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(event_bus.topology.exchange_name, envelope.event_type, envelope.SerializeToString(),
                              pika.BasicProperties(delivery_mode=2, headers=headers), mandatory=True)  # fmt: skip
    finally:
        connection.close()


def lab_items(components, staff_id: str) -> list[dict]:
    return components.board.page(staff(AGENCY, staff_id), domain.FOLDER_LAB, ItemFilter(), None, 50)["items"]


def test_forged_delivery_requests_put_nothing_on_any_board(consuming, event_bus):
    components, consumer, log = consuming
    web = bus_signing.current().signer.signers["web"]  # a service's real key, not the one it claims
    unsigned = critical("forged-1")
    as_notifications = critical("forged-2")
    web_signed = web.headers(as_notifications.event_type, as_notifications.SerializeToString(), "web")
    claimed = critical("forged-3")
    claimed_headers = {**web.headers(claimed.event_type, claimed.SerializeToString(), "web"),
                       HEADER_SIGNER: "notifications"}  # fmt: skip
    publish_raw(event_bus, unsigned, None)
    publish_raw(event_bus, as_notifications, web_signed)
    publish_raw(event_bus, claimed, claimed_headers)
    publisher = Publisher(event_bus.amqp_url, event_bus.topology)  # signs as notifications, as its relay does
    genuine = critical("genuine-1")
    publisher.publish([genuine])
    publisher.close()

    wait_until(lambda: lab_items(components, "stf_a"))
    wait_until(lambda: event_bus.message_count(consumer.parking_queue) == 3)
    genuine_id = delivery_module.notice_id(AGENCY, "lab", "genuine-1")
    for staff_id in ("stf_a", "stf_b"):
        assert [i["ref_id"] for i in lab_items(components, staff_id)] == [genuine_id]
    assert components.store.board_items.count_documents({"ref_id": {"$ne": genuine_id}}) == 0
    assert components.store.db[delivery_module.NOTICES].count_documents({"_id": {"$ne": genuine_id}}) == 0

    reasons = {}
    for _ in range(3):
        properties, body = event_bus.get(consumer.parking_queue)
        reasons[unpack(decode_envelope(body), inbox_pb2.DeliverItemRequest).source_ref] = properties.headers[
            HEADER_ERROR_REASON
        ]
    assert reasons == {"forged-1": "unsigned", "forged-2": "bad_signature", "forged-3": "bad_signature"}
    recorded = []
    for doc in log.collection.find({"kind": {"$eq": "event_refused"}}):
        for entry in doc["_outbox"].values():
            recorded.append(unpack(decode_envelope(entry["env"]), security_pb2.SecurityEvent))
    assert sorted(e.target_id for e in recorded) == sorted(
        e.event_id for e in (unsigned, as_notifications, claimed)
    )
    assert {(e.agency_id, e.actor_id, e.outcome) for e in recorded} == {(AGENCY, "notifications", "refused")}
