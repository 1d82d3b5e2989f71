"""Ending a session ends its access tokens at every service at once, not when they expire.

Directory refuses a revoked session's token immediately (its sessions store is the source of
truth); inbox hears `session.revoked.v1` over the bus within moments; a service instance
started after the revocation learns it from directory's ListRevokedSessions.
"""

from __future__ import annotations

import uuid

import grpc
import pytest
import requests

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from clinic.inbox.v1 import inbox_pb2, inbox_pb2_grpc
from services.kit.auth import AuthError, JwksKeySource, RevokedSessions, TokenVerifier
from services.kit.bus import Topology
from services.kit.revocations import start_revocation_listener
from services.kit.runtime import ServiceProcess
from services.kit.service_identity import ServiceTokens
from services.kit.transport import use_grpc_tls
from tests.e2e.conftest import Client, error_code, stack_channel
from tests.helpers import bearer
from tests.waits import wait_until

NEW_PASSWORD = "Fresh-Password-2026!"


def refused_with(reply: requests.Response, code: str) -> bool:
    return reply.status_code == 401 and reply.json().get("code") == code


def inbox_direct(stack, token: str) -> requests.Response:
    return requests.get(f"{stack.inbox_url}/api/v1/messages", headers=bearer(token), timeout=5)


def inbox_via_gateway(stack, token: str) -> requests.Response:
    return requests.get(f"{stack.gateway_url}/api/v1/messages", headers=bearer(token), timeout=5)


def directory_me(stack, token: str) -> requests.Response:
    return requests.get(f"{stack.directory_url}/api/v1/directory/me", headers=bearer(token), timeout=5)


def works_everywhere(stack, token: str) -> None:
    assert inbox_direct(stack, token).status_code == 200
    assert inbox_via_gateway(stack, token).status_code == 200
    assert directory_me(stack, token).status_code == 200


def assert_refused_everywhere(stack, token: str, directory_channel, inbox_target: str) -> None:
    # Directory: at once, over HTTP (direct and through the gateway) and gRPC.
    assert refused_with(directory_me(stack, token), "session_revoked")
    gateway_me = requests.get(f"{stack.gateway_url}/api/v1/directory/me", headers=bearer(token), timeout=5)
    assert refused_with(gateway_me, "session_revoked")
    with pytest.raises(grpc.RpcError) as caught:
        directory_pb2_grpc.DirectoryServiceStub(directory_channel).GetAgencySettings(
            directory_pb2.GetAgencySettingsRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_code(caught.value) == "session_revoked"
    # Inbox: as soon as the event arrives (polled, a few seconds at most), direct and via the gateway.
    wait_until(lambda: refused_with(inbox_direct(stack, token), "session_revoked"), timeout=5)
    assert refused_with(inbox_via_gateway(stack, token), "session_revoked")
    with stack_channel(stack, inbox_target) as channel, pytest.raises(grpc.RpcError) as caught:
        inbox_pb2_grpc.InboxServiceStub(channel).SendMessage(
            inbox_pb2.SendMessageRequest(to_staff_ids=["stf_riverbend_kim"], subject="s", body="b"),
            metadata=[("authorization", f"Bearer {token}")],
            timeout=5,
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_code(caught.value) == "session_revoked"


@pytest.fixture(scope="module")
def inbox_target(stack) -> str:
    return f"127.0.0.1:{stack.config.ports.inbox_grpc}"


@pytest.fixture
def fresh_staff(stack, login):
    """A staff member created for this test through the admin API (no other test knows them)."""
    admin = login("admin")
    username = f"revocation.{uuid.uuid4().hex[:8]}"
    reply = admin.post(
        "/api/v1/directory/staff",
        json={"username": username, "display_name": f"Temp {username}", "password": NEW_PASSWORD},
    )
    assert reply.status_code == 201, reply.text
    return reply.json() | {"password": NEW_PASSWORD}


def test_logout_is_refused_at_every_service_at_once(stack, login, directory_channel, inbox_target):
    admin = login("admin")
    signed_out = Client(stack.gateway_url, "nurse.kim")
    other_session = Client(stack.gateway_url, "nurse.kim")  # the same person on another device
    works_everywhere(stack, signed_out.token)

    reply = requests.post(
        f"{stack.gateway_url}/api/v1/auth/logout", json={"refresh_token": signed_out.refresh_token}, timeout=5
    )
    assert reply.status_code == 204

    assert_refused_everywhere(stack, signed_out.token, directory_channel, inbox_target)
    # Only that session ended: the person's other session and everyone else carry on.
    works_everywhere(stack, other_session.token)
    works_everywhere(stack, admin.token)


def test_deactivation_is_refused_at_every_service_at_once(stack, login, fresh_staff, directory_channel, inbox_target):
    admin = login("admin")
    member = Client(stack.gateway_url, fresh_staff["username"], fresh_staff["password"])
    colleague = login("dr.reyes")
    works_everywhere(stack, member.token)

    reply = admin.http.patch(
        f"{stack.gateway_url}/api/v1/directory/staff/{fresh_staff['id']}", json={"active": False}, timeout=5
    )
    assert reply.status_code == 200 and reply.json()["active"] is False

    assert_refused_everywhere(stack, member.token, directory_channel, inbox_target)
    refreshed = requests.post(
        f"{stack.gateway_url}/api/v1/auth/refresh", json={"refresh_token": member.refresh_token}, timeout=5
    )
    assert refreshed.status_code == 401
    works_everywhere(stack, colleague.token)
    works_everywhere(stack, admin.token)


def test_a_demoted_admin_is_refused_at_every_service_at_once(
    stack, login, fresh_staff, directory_channel, inbox_target
):
    admin = login("admin")
    staff_url = f"{stack.gateway_url}/api/v1/directory/staff/{fresh_staff['id']}"
    promoted = admin.http.patch(staff_url, json={"roles": ["staff", "admin"]}, timeout=5)
    assert promoted.status_code == 200
    member = Client(stack.gateway_url, fresh_staff["username"], fresh_staff["password"])
    works_everywhere(stack, member.token)

    demoted = admin.http.patch(staff_url, json={"roles": ["staff"]}, timeout=5)
    assert demoted.status_code == 200 and demoted.json()["roles"] == ["staff"]

    # No service may go on trusting the admin role the old token names.
    assert_refused_everywhere(stack, member.token, directory_channel, inbox_target)
    again = Client(stack.gateway_url, fresh_staff["username"], fresh_staff["password"])
    forbidden = again.http.patch(f"{stack.gateway_url}/api/v1/directory/agency", json={"name": "Mine"}, timeout=5)
    assert forbidden.status_code == 403
    works_everywhere(stack, admin.token)


def test_a_listener_started_after_the_revocation_learns_it_from_directory(
    stack, login, directory_target, service_secret
):
    session = Client(stack.gateway_url, "compliance.ortiz")
    unrelated = login("admin")
    reply = requests.post(
        f"{stack.gateway_url}/api/v1/auth/logout", json={"refresh_token": session.refresh_token}, timeout=5
    )
    assert reply.status_code == 204
    keys = JwksKeySource(f"{stack.directory_url}/api/v1/auth/jwks")
    # Revoked before this "replica" existed: its queue never saw the event.
    assert TokenVerifier(keys, revoked=RevokedSessions()).verify(session.token).session_id

    revoked = RevokedSessions()
    tokens = ServiceTokens(directory_target, "inbox", service_secret("inbox"), tls=stack.grpc_tls)
    process = ServiceProcess("bootstrap-test")
    try:
        with use_grpc_tls(stack.grpc_tls):  # the listener's channel to directory, as a replica opens it
            listener = start_revocation_listener(
                process, stack.config.amqp_url, Topology(), "e2e-bootstrap", revoked, tokens, directory_target
            )
        assert listener.wait_ready(15), "the listener did not consume and bootstrap"
        verifier = TokenVerifier(keys, revoked=revoked)
        with pytest.raises(AuthError) as caught:
            verifier.verify(session.token)
        assert caught.value.code == "session_revoked"
        assert verifier.verify(unrelated.token).subject == unrelated.staff_id
        assert listener.bootstraps == 1
    finally:
        process.stop()
        tokens.close()
