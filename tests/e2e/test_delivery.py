"""Other services put items on boards: DeliverItem over gRPC with a real service token, and the
board_item.delivery_requested.v1 event, seen by staff through the gateway."""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from clinic.inbox.v1 import inbox_pb2
from services.kit.bus import Publisher, Topology
from services.kit.events import new_envelope
from tests.e2e.conftest import error_code
from tests.helpers import auth
from tests.waits import wait_until

RIVERBEND = "agy_riverbend"


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
    publisher = Publisher(stack.config.amqp_url, Topology())
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
