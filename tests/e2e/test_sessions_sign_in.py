"""Sign-in limits end to end, through the gateway, from distinct client addresses (the loopback
network's 127.0.0.x, each its own client to the gateway): an attacker's failures lock the account
for the attacker's address only, both ways of signing in (the page's `/app/session` and
`/api/v1/auth/token`) spend one budget, a forged client address changes nothing, and the security
events name the real client address whichever way it signed in (docs/sessions.md)."""

from __future__ import annotations

import uuid

import pytest
import requests

from clinic.audit.v1 import security_pb2
from tests.e2e.conftest import EVENT_PAYLOADS
from tests.helpers import DEMO_PASSWORD, FromAddress, loopback_address

SECURITY_EVENT = "security_event.recorded.v1"
EVENT_PAYLOADS.setdefault(SECURITY_EVENT, security_pb2.SecurityEvent)
PASSWORD = "Lockout-Test-Password-26"
WRONG = "not-the-password!"


class Person:
    """Someone signing in through the gateway from `address`, by the API or by the page."""

    def __init__(self, gateway_url: str, address: str):
        self.gateway_url = gateway_url
        self.address = address
        self.http = requests.Session()
        self.http.mount("http://", FromAddress(address))

    def api_sign_in(self, username: str, password: str, **headers) -> requests.Response:
        return self.http.post(
            f"{self.gateway_url}/api/v1/auth/token",
            json={"username": username, "password": password},
            headers=headers,
            timeout=10,
        )

    def page_sign_in(self, username: str, password: str, **headers) -> requests.Response:
        return self.http.post(
            f"{self.gateway_url}/app/session",
            json={"username": username, "password": password},
            headers={"X-Clinic-CSRF": "1", "Origin": self.gateway_url, **headers},
            timeout=10,
        )


@pytest.fixture
def member(login) -> str:
    """A staff member created for this test (nobody else signs in as them)."""
    username = f"limits.{uuid.uuid4().hex[:8]}"
    reply = login("admin").post(
        "/api/v1/directory/staff", json={"username": username, "display_name": f"Temp {username}", "password": PASSWORD}
    )
    assert reply.status_code == 201, reply.text
    return username


def refused(reply: requests.Response) -> bool:
    """Refused by directory's limits (the gateway's own 429 has no code)."""
    code = reply.json().get("code") if reply.status_code == 429 else None
    return code == "too_many_attempts" and "Retry-After" in reply.headers


def test_an_attacker_cannot_lock_the_user_out_and_both_sign_in_paths_share_one_budget(stack, member):
    attacker, user = Person(stack.gateway_url, loopback_address()), Person(stack.gateway_url, loopback_address())
    for _ in range(5):  # ten failures in all, half through each way of signing in
        assert attacker.api_sign_in(member, WRONG).status_code == 401
        assert attacker.page_sign_in(member, WRONG).status_code == 401
    # The attacker's address is locked out of the account, whichever way it tries, right password or not ...
    assert refused(attacker.page_sign_in(member, PASSWORD))
    assert refused(attacker.api_sign_in(member, PASSWORD))
    # ... while the user, elsewhere, signs in as usual, by the page and by the API.
    assert user.page_sign_in(member, PASSWORD).status_code == 200
    assert user.api_sign_in(member, PASSWORD).status_code == 200


def forged(n: int) -> dict[str, str]:
    """Headers claiming another client address each time."""
    return {"X-Forwarded-For": f"198.51.100.{n}", "X-Real-IP": f"198.51.100.{n + 100}"}


def test_a_forged_client_address_does_not_give_a_fresh_one(stack, member):
    attacker = Person(stack.gateway_url, loopback_address())
    for n in range(10):
        sign_in = attacker.api_sign_in if n % 2 else attacker.page_sign_in
        assert sign_in(member, WRONG, **forged(n)).status_code == 401
    assert refused(attacker.api_sign_in(member, PASSWORD, **forged(20)))
    assert refused(attacker.page_sign_in(member, PASSWORD, **forged(21)))


def test_sign_ins_are_recorded_with_the_real_client_address(stack, events, member):
    person = Person(stack.gateway_url, loopback_address())
    with events.listen(SECURITY_EVENT) as heard:
        assert person.page_sign_in(member, WRONG, **forged(9)).status_code == 401
        signed_in = person.page_sign_in(member, PASSWORD)
        assert signed_in.status_code == 200
        failed = heard.wait_for(lambda e: e.payload.kind == "sign_in_failed" and e.payload.source == person.address)
        succeeded = heard.wait_for(
            lambda e: e.payload.kind == "sign_in_succeeded" and e.payload.source == person.address
        )
    staff_id = signed_in.json()["staff"]["id"]
    assert (failed.payload.reason, failed.payload.outcome) == ("bad_password", "refused")
    assert failed.payload.actor_id == staff_id
    assert (succeeded.payload.actor_id, succeeded.payload.agency_id) == (staff_id, "agy_riverbend")
    assert succeeded.payload.target_type == "session" and succeeded.envelope.producer == "directory"
    assert DEMO_PASSWORD not in str(failed.payload) and WRONG not in str(failed.payload)
