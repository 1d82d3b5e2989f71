"""SendMessage for services: auto-reply answers as the away staff member, in the thread, marked
automatic (staff threads and patient-portal threads); nobody else may send as someone else."""

from __future__ import annotations

import uuid

import grpc
import pytest
import requests

from clinic.inbox.v1 import inbox_pb2
from tests.e2e.conftest import error_code
from tests.helpers import auth


def subject() -> str:
    return f"Coverage {uuid.uuid4().hex[:8]}"


def automatic_reply(message_id: str, sender_staff_id: str, **fields) -> inbox_pb2.SendMessageRequest:
    fields = {"body": "I am out of the office until Monday.", "auto_reply": True, **fields}
    return inbox_pb2.SendMessageRequest(sender_staff_id=sender_staff_id, in_reply_to_message_id=message_id, **fields)


def thread_ids(client, thread_id: str) -> list[str]:
    reply = client.get(f"/api/v1/threads/{thread_id}")
    assert reply.status_code == 200, reply.text
    return [m["id"] for m in reply.json()["messages"]]


def test_auto_reply_answers_as_the_away_staff_member_in_the_thread(inbox_stub, service_token, reyes, kim, events):
    with events.listen("message.delivered.v1") as heard:
        original = reyes.send(to_staff_ids=[kim.staff_id], subject=subject()).json()["id"]
        request = automatic_reply(original, kim.staff_id, idempotency_key=f"auto-{original}")
        first = inbox_stub.SendMessage(request, metadata=auth(service_token("auto-reply")), timeout=5)
        again = inbox_stub.SendMessage(request, metadata=auth(service_token("auto-reply")), timeout=5)
        assert first.created and not again.created and again.message_id == first.message_id
        assert list(first.recipient_staff_ids) == [reyes.staff_id] and first.thread_id == original

        read = reyes.get(f"/api/v1/messages/{first.message_id}").json()
        assert read["sender"]["id"] == kim.staff_id and read["sender"]["name"] == "Jordan Kim, RN"
        assert read["auto_reply"] is True and read["in_reply_to"] == original
        assert read["subject"].startswith("Re: Coverage")
        assert thread_ids(reyes, original) == [original, first.message_id]

        event = heard.wait_for(lambda e: e.payload.message_id == first.message_id).payload
    assert event.auto_reply and event.sender_staff_id == kim.staff_id
    assert event.recipient_staff_id == reyes.staff_id and event.in_reply_to == original


def test_patient_auto_reply_goes_into_the_portal_thread(inbox_stub, service_token, stack):
    base = f"{stack.gateway_url}/api/v1/partner/portal/agencies/agy_riverbend/patients/portal_riverbend_0001"
    headers = {"apikey": stack.patient_portal_api_key}
    sent = requests.post(
        f"{base}/messages",
        json={"to_staff_id": "stf_riverbend_kim", "subject": subject(), "body": "Can I move my visit?"},
        headers=headers,
        timeout=10,
    )
    assert sent.status_code == 201, sent.text
    reply = inbox_stub.SendMessage(
        automatic_reply(sent.json()["id"], "stf_riverbend_kim", body="Our office answers within one business day."),
        metadata=auth(service_token("auto-reply")),
        timeout=5,
    )
    assert reply.created
    thread = requests.get(f"{base}/threads/{sent.json()['thread_id']}", headers=headers, timeout=10).json()
    assert [m["id"] for m in thread["messages"]] == [sent.json()["id"], reply.message_id]
    answer = thread["messages"][1]
    assert answer["body"] == "Our office answers within one business day."
    assert (answer["sender"]["kind"], answer["sender"]["id"]) == ("staff", "stf_riverbend_kim")


@pytest.mark.parametrize("client_id", ["notifications", "erx-bridge"])
def test_other_services_may_not_send_as_staff(inbox_stub, service_token, reyes, kim, client_id):
    original = reyes.send(to_staff_ids=[kim.staff_id], subject=subject()).json()["id"]
    before = reyes.counts("messages")
    with pytest.raises(grpc.RpcError) as caught:
        inbox_stub.SendMessage(
            automatic_reply(original, kim.staff_id), metadata=auth(service_token(client_id)), timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_code(caught.value) == "send_as_not_allowed"
    assert reyes.counts("messages") == before
    assert thread_ids(reyes, original) == [original]


def test_a_staff_member_may_not_send_as_a_colleague_nor_mark_automatic(inbox_stub, reyes, kim):
    original = reyes.send(to_staff_ids=[kim.staff_id], subject=subject()).json()["id"]
    before = reyes.counts("messages")
    for request in (
        automatic_reply(original, reyes.staff_id, auto_reply=False),
        inbox_pb2.SendMessageRequest(in_reply_to_message_id=original, body="x", auto_reply=True),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            inbox_stub.SendMessage(request, metadata=auth(kim.token), timeout=5)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_code(caught.value) == "send_as_not_allowed"
    assert reyes.counts("messages") == before
    assert thread_ids(reyes, original) == [original]
    # As themself, a staff member replies over gRPC like over HTTP.
    own = inbox_stub.SendMessage(
        inbox_pb2.SendMessageRequest(in_reply_to_message_id=original, body="Will do."),
        metadata=auth(kim.token),
        timeout=5,
    )
    assert list(own.recipient_staff_ids) == [reyes.staff_id]
    assert reyes.counts("messages") == (before[0] + 1, before[1] + 1)


@pytest.mark.parametrize(
    ("fields", "status", "code"),
    [
        ({"sender_staff_id": "stf_riverbend_young"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown_sender"),
        ({"sender_staff_id": "stf_lakeside_foster"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown_sender"),
        ({"sender_staff_id": "not an id"}, grpc.StatusCode.INVALID_ARGUMENT, "invalid_value"),
        ({"to_staff_ids": ["stf_riverbend_chen"]}, grpc.StatusCode.INVALID_ARGUMENT, "invalid_value"),
        ({"body": "   "}, grpc.StatusCode.INVALID_ARGUMENT, "invalid_value"),
        ({"in_reply_to_message_id": "msg_unknown"}, grpc.StatusCode.NOT_FOUND, "message_not_found"),
    ],
)
def test_bad_automatic_replies_are_refused(inbox_stub, service_token, reyes, kim, fields, status, code):
    original = reyes.send(to_staff_ids=[kim.staff_id], subject=subject()).json()["id"]
    before = reyes.counts("messages")
    request = {"sender_staff_id": kim.staff_id, "in_reply_to_message_id": original, "body": "Away.", **fields}
    with pytest.raises(grpc.RpcError) as caught:
        inbox_stub.SendMessage(
            inbox_pb2.SendMessageRequest(auto_reply=True, **request),
            metadata=auth(service_token("auto-reply")),
            timeout=5,
        )
    assert (caught.value.code(), error_code(caught.value)) == (status, code)
    assert reyes.counts("messages") == before
    assert thread_ids(reyes, original) == [original]
