"""Service identities: client credentials for a short-lived token, agency-scoped or platform-scoped."""

from __future__ import annotations

import grpc
import jwt
import pytest
import requests

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from clinic.inbox.v1 import inbox_pb2, inbox_pb2_grpc
from services.kit.auth import JwksKeySource, TokenVerifier
from services.kit.grpc_client import channel as service_channel
from services.kit.service_identity import ServiceTokens, acting_as
from tests.e2e.conftest import Client, error_code, stack_channel
from tests.helpers import auth

RIVERBEND, LAKESIDE = "agy_riverbend", "agy_lakeside"


@pytest.fixture(scope="module")
def stub(directory_channel):
    return directory_pb2_grpc.DirectoryServiceStub(directory_channel)


def issue(stub, client_id: str, secret: str, agency_id: str = "") -> directory_pb2.IssueServiceTokenResponse:
    return stub.IssueServiceToken(
        directory_pb2.IssueServiceTokenRequest(client_id=client_id, client_secret=secret, agency_id=agency_id),
        timeout=5,
    )


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def signed_out_session(stack, username: str) -> tuple[Client, str]:
    """Sign `username` in through the gateway and out again; returns the client and its session id."""
    session = Client(stack.gateway_url, username)
    reply = session.post("/api/v1/auth/logout", json={"refresh_token": session.refresh_token})
    assert reply.status_code == 204
    return session, jwt.decode(session.token, options={"verify_signature": False})["sid"]


def test_wrong_client_or_secret_is_unauthenticated(stub, service_secret):
    for client_id, secret in [
        ("inbox", "not-the-secret"),
        ("inbox", ""),
        ("nobody", service_secret("inbox")),
        ("notifications", service_secret("inbox")),  # another client's secret
    ]:
        error = refused(lambda c=client_id, s=secret: issue(stub, c, s, RIVERBEND))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_code(error) == "invalid_client"


def test_unknown_agency_is_not_found(stub, service_secret):
    error = refused(lambda: issue(stub, "inbox", service_secret("inbox"), "agy_nowhere"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_agency_token_sees_its_agency_only(stub, stack, service_secret):
    reply = issue(stub, "inbox", service_secret("inbox"), RIVERBEND)
    assert 60 <= reply.expires_in <= 900
    claims = jwt.decode(reply.access_token, options={"verify_signature": False})
    assert claims["sub"] == "svc:inbox" and claims["kind"] == "service" and claims["roles"] == ["service"]
    assert claims["agency_id"] == RIVERBEND and "sid" not in claims
    # Every service's verifier accepts it (the same one inbox runs).
    identity = TokenVerifier(JwksKeySource(f"{stack.directory_url}/api/v1/auth/jwks")).verify(reply.access_token)
    assert identity.kind == "service" and identity.agency_id == RIVERBEND

    everyone = stub.ResolveRecipients(
        directory_pb2.ResolveRecipientsRequest(whole_agency=True), metadata=auth(reply.access_token), timeout=5
    )
    assert "stf_riverbend_kim" in everyone.staff_ids
    described = stub.GetStaff(
        directory_pb2.GetStaffRequest(staff_ids=everyone.staff_ids), metadata=auth(reply.access_token), timeout=5
    )
    assert {m.agency_id for m in described.staff} == {RIVERBEND} and not described.missing_staff_ids
    across = stub.ResolveRecipients(
        directory_pb2.ResolveRecipientsRequest(staff_ids=["stf_lakeside_admin", "stf_riverbend_kim"]),
        metadata=auth(reply.access_token),
        timeout=5,
    )
    assert list(across.staff_ids) == ["stf_riverbend_kim"]
    assert list(across.missing_staff_ids) == ["stf_lakeside_admin"]
    staff = stub.GetStaff(
        directory_pb2.GetStaffRequest(staff_ids=["stf_lakeside_admin"]), metadata=auth(reply.access_token), timeout=5
    )
    assert not staff.staff and list(staff.missing_staff_ids) == ["stf_lakeside_admin"]
    # An agency-scoped service token is not a platform token.
    error = refused(
        lambda: stub.ListRevokedSessions(
            directory_pb2.ListRevokedSessionsRequest(), metadata=auth(reply.access_token), timeout=5
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


def test_platform_token_reaches_platform_methods_only(stub, stack, service_secret):
    platform = issue(stub, "inbox", service_secret("inbox")).access_token
    assert jwt.decode(platform, options={"verify_signature": False})["agency_id"] == ""
    for call in (
        lambda: stub.ResolveRecipients(
            directory_pb2.ResolveRecipientsRequest(whole_agency=True), metadata=auth(platform), timeout=5
        ),
        lambda: stub.GetStaff(
            directory_pb2.GetStaffRequest(staff_ids=["stf_riverbend_kim"]), metadata=auth(platform), timeout=5
        ),
        lambda: stub.GetAgencySettings(directory_pb2.GetAgencySettingsRequest(), metadata=auth(platform), timeout=5),
    ):
        assert refused(call).code() == grpc.StatusCode.PERMISSION_DENIED
    # Accepted by the platform method, which lists (among others) a session that just ended.
    _, sid = signed_out_session(stack, "nurse.foster")
    listed = stub.ListRevokedSessions(directory_pb2.ListRevokedSessionsRequest(), metadata=auth(platform), timeout=5)
    assert sid in [s.session_id for s in listed.sessions]
    # Inbox serves agency data only: its HTTP edge and its gRPC refuse a platform token too.
    for base in (stack.inbox_url, stack.gateway_url):
        reply = requests.get(f"{base}/api/v1/messages", headers={"Authorization": f"Bearer {platform}"}, timeout=5)
        assert reply.status_code == 403 and reply.json()["code"] == "agency_scope_required"
    with stack_channel(stack, f"127.0.0.1:{stack.config.ports.inbox_grpc}") as inbox_channel:
        send = inbox_pb2_grpc.InboxServiceStub(inbox_channel).SendMessage
        error = refused(
            lambda: send(
                inbox_pb2.SendMessageRequest(to_staff_ids=["stf_riverbend_kim"], subject="s", body="b"),
                metadata=auth(platform),
                timeout=5,
            )
        )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


def test_staff_token_is_refused_by_list_revoked_sessions(stub, login):
    admin = login("admin")
    error = refused(
        lambda: stub.ListRevokedSessions(
            directory_pb2.ListRevokedSessionsRequest(), metadata=auth(admin.token), timeout=5
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


def test_list_revoked_sessions_lists_a_sign_out(stub, stack, service_secret):
    session, sid = signed_out_session(stack, "nurse.foster")
    _, later_sid = signed_out_session(stack, "frontdesk.baker")
    platform = issue(stub, "inbox", service_secret("inbox")).access_token
    listed = stub.ListRevokedSessions(directory_pb2.ListRevokedSessionsRequest(), metadata=auth(platform), timeout=5)
    ids = [s.session_id for s in listed.sessions]
    assert ids.count(sid) == 1 and ids.count(later_sid) == 1
    assert ids.index(sid) < ids.index(later_sid)  # oldest first
    event = listed.sessions[ids.index(sid)]
    assert event.staff_id == session.staff_id and event.agency_id == session.agency_id and event.reason == "logout"
    assert event.access_expires_at.ToMilliseconds() == event.revoked_at.ToMilliseconds() + 900_000
    stamps = [s.revoked_at.ToMilliseconds() for s in listed.sessions]
    assert len(stamps) >= 2 and stamps == sorted(stamps)


def test_service_tokens_and_acting_as_against_directory(stack, directory_target, service_secret):
    tokens = ServiceTokens(directory_target, "inbox", service_secret("inbox"), tls=stack.grpc_tls)
    channel = service_channel(directory_target, tls=stack.grpc_tls)
    try:
        riverbend = tokens.identity(RIVERBEND)
        assert tokens.identity(RIVERBEND) is riverbend  # cached
        assert tokens.identity(LAKESIDE).token != riverbend.token
        stub = directory_pb2_grpc.DirectoryServiceStub(channel)
        with acting_as(riverbend):  # the kit's client interceptor forwards the service token
            settings = stub.GetAgencySettings(directory_pb2.GetAgencySettingsRequest())
        assert settings.agency_id == RIVERBEND
        with acting_as(tokens.identity(LAKESIDE)):
            assert stub.GetAgencySettings(directory_pb2.GetAgencySettingsRequest()).agency_id == LAKESIDE
    finally:
        channel.close()
        tokens.close()
