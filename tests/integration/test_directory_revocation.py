"""Session revocation in the directory: the event staged with the revocation itself, its publication,
the directory's own immediate refusal, and ListRevokedSessions / IssueServiceToken over real gRPC."""

from __future__ import annotations

import grpc
import jwt
import pytest

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from services.directory import events
from services.kit.bus import BatchPublisher
from services.kit.events import decode_envelope, unpack
from services.kit.mongo import now_ms
from services.kit.outbox import OUTBOX, OUTBOX_AT
from services.kit.settings import secret_digest
from tests.waits import wait_until

MINUTE_MS = 60_000


@pytest.fixture
def directory_overrides():
    """The `dut` knows the inbox service client."""
    return {"SERVICE_CLIENTS": f"inbox:{secret_digest('inbox-secret')}"}


@pytest.fixture
def stub(dut):
    server = dut.directory.grpc_server("127.0.0.1", 0)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield directory_pb2_grpc.DirectoryServiceStub(channel)
    channel.close()
    server.stop(0)


def sign_in(dut, username: str) -> dict:
    response = dut.sign_in(username)
    assert response.status_code == 200
    body = response.get_json()
    body["sid"] = jwt.decode(body["access_token"], options={"verify_signature": False})["sid"]
    return body


def staged(dut, session_id: str) -> list[directory_pb2.SessionRevoked]:
    doc = dut.store.sessions.find_one({"_id": session_id})
    found = []
    for event_id, entry in (doc.get(OUTBOX) or {}).items():
        envelope = decode_envelope(entry["env"])
        assert envelope.event_id == event_id and entry["rk"] == envelope.event_type == "session.revoked.v1"
        assert envelope.producer == "directory" and envelope.agency_id == doc["agency_id"]
        found.append(unpack(envelope, directory_pb2.SessionRevoked))
    if found:
        assert doc[OUTBOX_AT] > 0
    return found


def test_sign_out_stages_the_event_in_the_session_and_the_directory_refuses_at_once(dut):
    grant = sign_in(dut, "nurse.kim")
    headers = {"Authorization": f"Bearer {grant['access_token']}"}
    assert dut.client.get("/api/v1/directory/me", headers=headers).status_code == 200
    assert dut.client.post("/api/v1/auth/logout", json={"refresh_token": grant["refresh_token"]}).status_code == 204

    refused = dut.client.get("/api/v1/directory/me", headers=headers)
    assert refused.status_code == 401 and refused.get_json()["code"] == "session_revoked"
    [event] = staged(dut, grant["sid"])
    doc = dut.store.get_session(grant["sid"])
    assert (event.session_id, event.staff_id, event.agency_id, event.reason) == (
        grant["sid"], "stf_riverbend_kim", "agy_riverbend", "logout"
    )
    assert event.revoked_at.ToMilliseconds() == doc["revoked_at"]
    assert event.access_expires_at.ToMilliseconds() == doc["revoked_at"] + 900_000
    # Signing out again announces nothing new.
    dut.client.post("/api/v1/auth/logout", json={"refresh_token": grant["refresh_token"]})
    assert len(staged(dut, grant["sid"])) == 1


def test_refresh_token_reuse_is_announced(dut):
    grant = sign_in(dut, "nurse.kim")
    assert dut.client.post("/api/v1/auth/refresh", json={"refresh_token": grant["refresh_token"]}).status_code == 200
    assert dut.client.post("/api/v1/auth/refresh", json={"refresh_token": grant["refresh_token"]}).status_code == 401
    assert [e.reason for e in staged(dut, grant["sid"])] == ["refresh_token_reuse"]


def test_deactivation_announces_each_live_session_once(dut):
    first, second = sign_in(dut, "nurse.kim"), sign_in(dut, "nurse.kim")
    # A session that ended long ago (and whose last token expired) is closed without an announcement.
    old = now_ms() - 24 * 3600 * 1000
    dut.store.sessions.insert_one({
        "_id": "ses_longgone", "staff_id": "stf_riverbend_kim", "agency_id": "agy_riverbend",
        "created_at": old, "expires_at": old + MINUTE_MS, "revoked_at": 0, "revoked_reason": "",
    })
    admin = {"Authorization": f"Bearer {dut.token('admin')}"}
    reply = dut.client.patch("/api/v1/directory/staff/stf_riverbend_kim", json={"active": False}, headers=admin)
    assert reply.status_code == 200
    for grant in (first, second):
        assert [e.reason for e in staged(dut, grant["sid"])] == ["staff_deactivated"]
    assert staged(dut, "ses_longgone") == []
    assert dut.store.get_session("ses_longgone")["revoked_reason"] == "staff_deactivated"


def test_the_relay_publishes_the_revocation(dut, event_bus):
    received = []
    consumer = event_bus.consumer("revocations", ["session.revoked.v1"], received.append)
    grant = sign_in(dut, "dr.reyes")
    publisher = BatchPublisher(event_bus.amqp_url, event_bus.topology)
    relay = dut.directory.outbox_relay(publisher, lease_ttl_s=None)
    try:
        with consumer.running():
            dut.client.post("/api/v1/auth/logout", json={"refresh_token": grant["refresh_token"]})
            assert relay.run_once() == 1
            wait_until(lambda: received)
    finally:
        publisher.close()
    event = unpack(received[0], directory_pb2.SessionRevoked)
    assert event.session_id == grant["sid"] and event.reason == "logout"
    assert OUTBOX not in dut.store.sessions.find_one({"_id": grant["sid"]})


def platform_token(stub) -> str:
    return stub.IssueServiceToken(
        directory_pb2.IssueServiceTokenRequest(client_id="inbox", client_secret="inbox-secret"), timeout=5
    ).access_token


def test_list_revoked_sessions_is_bounded_to_one_token_lifetime(dut, stub):
    now = now_ms()
    for name, revoked_at in [("ses_ancient", now - 20 * MINUTE_MS), ("ses_recent", now - 10 * MINUTE_MS)]:
        dut.store.sessions.insert_one({
            "_id": name, "staff_id": "stf_riverbend_kim", "agency_id": "agy_riverbend", "created_at": revoked_at,
            "expires_at": now + MINUTE_MS, "revoked_at": revoked_at, "revoked_reason": "logout",
        })
    grant = sign_in(dut, "nurse.kim")
    dut.client.post("/api/v1/auth/logout", json={"refresh_token": grant["refresh_token"]})
    metadata = [("authorization", f"Bearer {platform_token(stub)}")]

    listed = stub.ListRevokedSessions(directory_pb2.ListRevokedSessionsRequest(since_ms=0), metadata=metadata)
    assert [s.session_id for s in listed.sessions] == ["ses_recent", grant["sid"]]
    later = stub.ListRevokedSessions(
        directory_pb2.ListRevokedSessionsRequest(since_ms=now - 5 * MINUTE_MS), metadata=metadata
    )
    assert [s.session_id for s in later.sessions] == [grant["sid"]]
    assert dut.store.revoked_sessions_since(now - 30 * MINUTE_MS, 10)[0]["_id"] == "ses_ancient"


def test_service_tokens_over_grpc(dut, stub):
    def issue(secret: str, agency: str = "") -> str:
        return stub.IssueServiceToken(
            directory_pb2.IssueServiceTokenRequest(client_id="inbox", client_secret=secret, agency_id=agency),
            timeout=5,
        ).access_token

    with pytest.raises(grpc.RpcError) as caught:
        issue("inbox-secret-not")
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as caught:
        issue("inbox-secret", "agy_nowhere")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    lakeside = [("authorization", f"Bearer {issue('inbox-secret', 'agy_lakeside')}")]
    settings = stub.GetAgencySettings(directory_pb2.GetAgencySettingsRequest(), metadata=lakeside, timeout=5)
    assert settings.agency_id == "agy_lakeside"
    platform = [("authorization", f"Bearer {issue('inbox-secret')}")]
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetAgencySettings(directory_pb2.GetAgencySettingsRequest(), metadata=platform, timeout=5)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert dict(caught.value.trailing_metadata())["error-code"] == "agency_scope_required"
    # Service tokens have no session, so revocation checks never touch them; staff calls stay open to staff.
    assert dut.directory.verifier.verify(issue("inbox-secret")).session_id == ""
    staff = [("authorization", f"Bearer {dut.token('admin')}")]
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListRevokedSessions(directory_pb2.ListRevokedSessionsRequest(), metadata=staff, timeout=5)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_session_reads_leave_the_staged_events_behind(dut):
    grant = sign_in(dut, "nurse.kim")
    dut.client.post("/api/v1/auth/logout", json={"refresh_token": grant["refresh_token"]})
    assert staged(dut, grant["sid"])  # the event is there, waiting for the relay
    session = dut.store.get_session(grant["sid"])
    assert session["revoked_reason"] == "logout" and session["staff_id"] == "stf_riverbend_kim"
    [listed] = dut.store.revoked_sessions_since(now_ms() - MINUTE_MS, 10)
    assert listed["_id"] == grant["sid"] and listed["revoked_reason"] == "logout"
    for doc in (session, listed):
        assert not [name for name in doc if name.startswith("_outbox")]


def test_an_access_token_for_a_session_directory_never_issued_is_refused(dut):
    assert dut.store.is_session_revoked("ses_never_issued")
    assert not dut.store.is_session_revoked(sign_in(dut, "nurse.kim")["sid"])
    assert events.access_expires_at(1_000) == 901_000
