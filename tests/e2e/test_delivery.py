"""Other services put items on boards: DeliverItem over gRPC with a real service token, and the
board_item.delivery_requested.v1 event, seen by staff through the gateway."""

from __future__ import annotations

import uuid

import grpc
import pika
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from clinic.inbox.v1 import inbox_pb2
from services.kit.bus import Publisher, Topology
from services.kit.bus.signing import development_keyring
from services.kit.events import decode_envelope, new_envelope, unpack
from tests.e2e.conftest import error_code
from tests.helpers import auth
from tests.waits import wait_until

RIVERBEND = "agy_riverbend"
PARKING_QUEUE = "inbox.board-item-deliveries.parking"


def lab_request(staff_ids: list[str], **overrides) -> inbox_pb2.DeliverItemRequest:
    fields = {
        "kind": inbox_pb2.DELIVERED_KIND_LAB,
        "recipients": inbox_pb2.Recipients(staff_ids=staff_ids),
        "title": "Lab result available",
        "summary": "Basic metabolic panel, final",
        "severity": inbox_pb2.SEVERITY_ABNORMAL,
        "status": "final",
        "links": [inbox_pb2.ActionLink(label="Open result", url="https://ehr.example/results/1")],
        "source": "lab",
        "source_ref": f"order-{uuid.uuid4().hex[:10]}",
    }
    fields.update(overrides)
    return inbox_pb2.DeliverItemRequest(**fields)


def schedule_items(client, title: str) -> list[dict]:
    return [item for item in client.items(folder="schedule", limit=100)["items"] if item["title"] == title]


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_a_delivered_lab_item_reaches_the_recipients_board(inbox_stub, service_token, kim, reyes):
    before = kim.counts("lab")
    request = lab_request([kim.staff_id])
    reply = inbox_stub.DeliverItem(request, metadata=auth(service_token("notifications")), timeout=10)
    assert reply.created and reply.applied and list(reply.recipient_staff_ids) == [kim.staff_id]

    [item] = [i for i in kim.items(folder="lab", limit=100)["items"] if i["ref_id"] == reply.item_id]
    assert item["title"] == "Lab result available" and item["summary"] == "Basic metabolic panel, final"
    assert item["severity"] == "abnormal" and item["status"] == "final" and item["read"] is False
    assert item["sender"]["name"] == "Notifications"
    assert kim.counts("lab") == (before[0] + 1, before[1] + 1)
    assert all(i["ref_id"] != reply.item_id for i in reyes.items(folder="lab", limit=100)["items"])
    assert reyes.get(f"/api/v1/board/items/{item['id']}").status_code == 404

    opened = kim.get(f"/api/v1/board/items/{item['id']}")
    assert opened.status_code == 200, opened.text
    assert opened.json()["links"] == [{"label": "Open result", "url": "https://ehr.example/results/1"}]
    assert opened.json()["source_ref"] == request.source_ref and opened.json()["read"] is True
    assert kim.counts("lab") == (before[0], before[1] + 1)

    # The same source_ref again updates the item in place; resolving it keeps it listed, read.
    again = inbox_stub.DeliverItem(
        lab_request([kim.staff_id], source_ref=request.source_ref, status="reviewed", resolved=True),
        metadata=auth(service_token("notifications")),
        timeout=10,
    )
    assert again.applied and not again.created and again.item_id == reply.item_id
    [updated] = [i for i in kim.items(folder="lab", limit=100)["items"] if i["ref_id"] == reply.item_id]
    assert updated["id"] == item["id"] and updated["status"] == "reviewed" and updated["resolved_at"]
    assert kim.counts("lab") == (before[0], before[1] + 1)


def test_a_staff_token_cannot_deliver(inbox_stub, kim):
    before = kim.counts("lab")
    error = refused(lambda: inbox_stub.DeliverItem(lab_request([kim.staff_id]), metadata=auth(kim.token), timeout=10))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_code(error) == "service_only"
    assert kim.counts("lab") == before


def test_a_producer_delivers_only_its_own_kinds(inbox_stub, service_token, kim):
    before = kim.counts("lab")
    error = refused(
        lambda: inbox_stub.DeliverItem(
            lab_request([kim.staff_id]), metadata=auth(service_token("erx-bridge")), timeout=10
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_code(error) == "kind_not_allowed"
    assert kim.counts("lab") == before


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"title": ""}, "missing_field"),
        ({"links": [inbox_pb2.ActionLink(label="Open", url="javascript:alert(1)")]}, "invalid_link"),
        ({"recipients": inbox_pb2.Recipients(staff_ids=["stf_lakeside_admin"])}, "unknown_recipients"),
        ({"kind": inbox_pb2.DELIVERED_KIND_UNSPECIFIED}, "invalid_kind"),
        ({"due_at": Timestamp(seconds=10**15)}, "invalid_value"),
    ],
)
def test_bad_input_is_invalid_argument_with_its_code(inbox_stub, service_token, kim, overrides, code):
    before = kim.counts("lab")
    request = lab_request([kim.staff_id], **overrides)
    error = refused(lambda: inbox_stub.DeliverItem(request, metadata=auth(service_token("notifications")), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_code(error) == code
    assert kim.counts("lab") == before


def requested(kim, title: str):
    """A board_item.delivery_requested.v1 event from notifications: a schedule item for kim."""
    request = lab_request([kim.staff_id], kind=inbox_pb2.DELIVERED_KIND_SCHEDULE, title=title)
    return new_envelope("board_item.delivery_requested.v1", request, agency_id=RIVERBEND, producer="notifications")


def test_a_requested_delivery_event_lands_and_is_announced(stack, kim, events, inbox_db):
    title, marker = f"Intake moved to 3pm {uuid.uuid4().hex[:6]}", f"Marker {uuid.uuid4().hex[:6]}"
    publisher = Publisher(stack.config.amqp_url, Topology(), signer=development_keyring(stack.run_dir).signer)
    try:
        with events.listen("board_item.delivered.v1") as heard:
            event = requested(kim, title)
            publisher.publish([event, event])  # a redelivered event has its effect once
            publisher.publish([requested(kim, marker)])
            [marked] = wait_until(lambda: schedule_items(kim, marker), timeout=15)  # consumed after the pair
            [item] = wait_until(lambda: schedule_items(kim, title), timeout=15)
            event = heard.wait_for(lambda e: e.payload.item_id == item["id"], timeout=15)
            heard.wait_for(lambda e: e.payload.item_id == marked["id"], timeout=15)  # announced after the pair
            assert [e for e in heard.drain() if e.payload.item_id == item["id"]] == [event]  # announced once
            announced = event.payload
    finally:
        publisher.close()
    assert announced.recipient_staff_id == kim.staff_id and announced.board_kind == "schedule"
    assert announced.agency_id == RIVERBEND and announced.created
    notice = inbox_db.notices.find_one({"_id": {"$eq": item["ref_id"]}})
    assert notice["rev"] == 1
    assert inbox_db.board_items.count_documents({"ref_id": {"$eq": item["ref_id"]}}) == 1


# --- eRx items go only to staff with ePrescribing ------------------------------------------------------


def erx_request(staff_ids: list[str], **overrides) -> inbox_pb2.DeliverItemRequest:
    fields = {
        "kind": inbox_pb2.DELIVERED_KIND_ERX,
        "recipients": inbox_pb2.Recipients(staff_ids=staff_ids),
        "title": "Refill request pending",
        "status": "pending",
        "source": "dosespot",
        "source_ref": f"rx-{uuid.uuid4().hex[:10]}",
    }
    fields.update(overrides)
    return inbox_pb2.DeliverItemRequest(**fields)


def erx_refs(client) -> list[str]:
    return [item["ref_id"] for item in client.items(folder="erx", limit=100)["items"]]


@pytest.fixture
def deactivated_prescriber(admin):
    """A Riverbend prescriber flagged for ePrescribing, then deactivated (no other test knows them)."""
    username = f"np.former.{uuid.uuid4().hex[:8]}"
    body = {
        "username": username,
        "display_name": f"Former {username}",
        "password": "long-enough-password",
        "roles": ["staff", "prescriber"],
        "eprescribing_enabled": True,
        "erx_clinician_id": "2999",
    }
    created = admin.post("/api/v1/directory/staff", json=body)
    assert created.status_code == 201, created.text
    staff_id = created.json()["id"]
    reply = admin.patch(f"/api/v1/directory/staff/{staff_id}", json={"active": False})
    assert reply.status_code == 200 and reply.json()["eprescribing_flag"] is True, reply.text
    return staff_id


def test_an_erx_item_reaches_a_prescriber_with_eprescribing(inbox_stub, service_token, reyes, kim):
    assert reyes.get("/api/v1/directory/me").json()["eprescribing_enabled"] is True
    before = reyes.counts("erx")
    reply = inbox_stub.DeliverItem(
        erx_request([reyes.staff_id]), metadata=auth(service_token("erx-bridge")), timeout=10
    )
    assert reply.created and reply.applied and list(reply.recipient_staff_ids) == [reyes.staff_id]
    [item] = [i for i in reyes.items(folder="erx", limit=100)["items"] if i["ref_id"] == reply.item_id]
    assert item["title"] == "Refill request pending" and item["sender"]["name"] == "eRx"
    assert reyes.counts("erx") == (before[0] + 1, before[1] + 1)
    assert reply.item_id not in erx_refs(kim)


@pytest.mark.parametrize("who", ["nurse", "other agency", "deactivated"])
def test_an_erx_item_for_staff_without_eprescribing_is_permission_denied(
    request, inbox_stub, service_token, inbox_db, kim, reyes, who
):
    if who == "nurse":
        staff_id, agency = kim.staff_id, RIVERBEND  # not flagged
    elif who == "other agency":
        staff_id, agency = "stf_lakeside_ramirez", "agy_lakeside"  # flagged; Lakeside does not subscribe
    else:
        staff_id, agency = request.getfixturevalue("deactivated_prescriber"), RIVERBEND
    delivery = erx_request([staff_id])
    token = service_token("erx-bridge", agency)
    error = refused(lambda: inbox_stub.DeliverItem(delivery, metadata=auth(token), timeout=10))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_code(error) == "erx_not_enabled"
    assert inbox_db.notices.count_documents({"source_ref": {"$eq": delivery.source_ref}}) == 0  # nothing written
    # Naming a prescriber with ePrescribing as well does not help: the whole delivery is refused.
    if agency == RIVERBEND:
        both = erx_request([reyes.staff_id, staff_id])
        error = refused(lambda: inbox_stub.DeliverItem(both, metadata=auth(token), timeout=10))
        assert error_code(error) == "erx_not_enabled"
        assert inbox_db.notices.count_documents({"source_ref": {"$eq": both.source_ref}}) == 0


def test_other_kinds_are_not_gated_by_eprescribing(inbox_stub, service_token, kim):
    reply = inbox_stub.DeliverItem(
        lab_request([kim.staff_id]), metadata=auth(service_token("notifications")), timeout=10
    )
    assert reply.applied and list(reply.recipient_staff_ids) == [kim.staff_id]


def parked(amqp_url: str, event_ids: set[str]) -> dict[str, str]:
    """Parking reasons of these events in inbox's delivery parking queue, left in place (the messages
    are fetched unacknowledged and requeued when the channel closes)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        reasons = {}
        while True:
            method, properties, body = channel.basic_get(PARKING_QUEUE, auto_ack=False)
            if method is None:
                break
            event_id = decode_envelope(body).event_id
            if event_id in event_ids:
                reasons[event_id] = (properties.headers or {}).get("x-error-reason", "")
        channel.close()
        return reasons
    finally:
        connection.close()


def test_a_requested_erx_delivery_for_staff_without_eprescribing_is_parked(stack, kim, reyes, inbox_db):
    kim_before = kim.counts("erx")
    publisher = Publisher(stack.config.amqp_url, Topology(), signer=development_keyring(stack.run_dir).signer)
    nurse = new_envelope(
        "board_item.delivery_requested.v1", erx_request([kim.staff_id]), agency_id=RIVERBEND, producer="erx-bridge"
    )
    ramirez = new_envelope(
        "board_item.delivery_requested.v1",
        erx_request(["stf_lakeside_ramirez"]),
        agency_id="agy_lakeside",
        producer="erx-bridge",
    )
    marker_request = erx_request([reyes.staff_id])
    marker = new_envelope(
        "board_item.delivery_requested.v1", marker_request, agency_id=RIVERBEND, producer="erx-bridge"
    )
    try:
        publisher.publish([nurse, ramirez])
        publisher.publish([marker])
    finally:
        publisher.close()
    wanted = {nurse.event_id, ramirez.event_id}
    reasons = wait_until(lambda: len(found := parked(stack.config.amqp_url, wanted)) == 2 and found, timeout=15)
    assert reasons == {nurse.event_id: "erx_not_enabled", ramirez.event_id: "erx_not_enabled"}
    wait_until(lambda: inbox_db.notices.count_documents({"source_ref": {"$eq": marker_request.source_ref}}) == 1)
    for event in (nurse, ramirez):
        source_ref = unpack(event, inbox_pb2.DeliverItemRequest).source_ref
        assert inbox_db.notices.count_documents({"source_ref": {"$eq": source_ref}}) == 0  # nothing half-written
    assert kim.counts("erx") == kim_before
