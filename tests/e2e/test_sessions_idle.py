"""Automatic logoff enforced by the server, end to end (docs/sessions.md): only the page's activity
reports keep a session (refreshing, reading the board and the live event stream do not), a refresh
past the agency's idle time is refused, and a session left idle stops working at every service
within a minute, with no page left to sign it out.

The agency's idle time (minutes at least) is not waited out here: the session's recorded
activity is moved into the past in directory's database, as that much idle time would have left it.
"""

from __future__ import annotations

import time

import jwt
import pytest
import requests

from clinic.audit.v1 import security_pb2
from clinic.directory.v1 import directory_pb2
from tests.e2e.conftest import EVENT_PAYLOADS, Client
from tests.helpers import DEMO_PASSWORD, bearer
from tests.waits import wait_until

SECURITY_EVENT = "security_event.recorded.v1"
EVENT_PAYLOADS.setdefault(SECURITY_EVENT, security_pb2.SecurityEvent)
SESSION_REVOKED = "session.revoked.v1"
EVENT_PAYLOADS.setdefault(SESSION_REVOKED, directory_pb2.SessionRevoked)
IDLE_MS = 15 * 60_000  # the demo agencies' idle_signout_minutes
SWEEP_S = 20  # directory's SESSION_IDLE_SWEEP_S default


@pytest.fixture(scope="module")
def directory_db(stack, mongo_client):
    return mongo_client[f"{stack.db_prefix}directory"]


class Page:
    """What the Message Board page does over HTTP: sign in with the refresh cookie, refresh, report activity."""

    def __init__(self, gateway_url: str, username: str):
        self.base = gateway_url
        self.http = requests.Session()
        self.same_origin = {"X-Clinic-CSRF": "1", "Origin": gateway_url}
        reply = self.http.post(
            f"{gateway_url}/app/session",
            json={"username": username, "password": DEMO_PASSWORD},
            headers=self.same_origin,
            timeout=10,
        )
        assert reply.status_code == 200, reply.text
        self.token = reply.json()["access_token"]

    def refresh(self) -> requests.Response:
        reply = self.http.post(f"{self.base}/app/session/refresh", headers=self.same_origin, timeout=10)
        if reply.status_code == 200:
            self.token = reply.json()["access_token"]
        return reply

    def report_activity(self) -> requests.Response:
        return requests.post(f"{self.base}/app/activity", headers=bearer(self.token), timeout=10)

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(f"{self.base}{path}", headers=bearer(self.token), timeout=10, **kwargs)


def session_of(directory_db, token: str) -> dict:
    sid = jwt.decode(token, options={"verify_signature": False})["sid"]
    return directory_db.sessions.find_one({"_id": sid})


def idle_for(directory_db, token: str, ms: int) -> str:
    """Move the session's recorded activity `ms` into the past, as that long without activity leaves it."""
    session = session_of(directory_db, token)
    last = int(time.time() * 1000) - ms
    directory_db.sessions.update_one(
        {"_id": session["_id"]}, {"$set": {"last_activity_at": last, "idle_expires_at": last + IDLE_MS}}
    )
    return session["_id"]


def refused_as_revoked(reply: requests.Response) -> bool:
    return reply.status_code == 401 and reply.json().get("code") == "session_revoked"


def test_only_the_pages_activity_reports_keep_a_session(stack, directory_db):
    page = Page(stack.gateway_url, "nurse.kim")
    signed_in = session_of(directory_db, page.token)
    assert signed_in["idle_expires_at"] == signed_in["last_activity_at"] + IDLE_MS
    # What a page does on its own, user or no user: refresh its token, read the board, hold the live stream.
    time.sleep(0.05)
    assert page.refresh().status_code == 200
    assert page.get("/api/v1/board").status_code == 200
    with page.get("/app/events", stream=True) as stream:
        assert stream.status_code == 200
        next(stream.iter_lines())  # connected
    untouched = session_of(directory_db, page.token)
    assert untouched["last_activity_at"] == signed_in["last_activity_at"]
    assert untouched["idle_expires_at"] == signed_in["idle_expires_at"]
    # The user's own activity, as the page reports it.
    assert page.report_activity().status_code == 204
    active = session_of(directory_db, page.token)
    assert active["last_activity_at"] > signed_in["last_activity_at"]
    assert active["idle_expires_at"] == active["last_activity_at"] + IDLE_MS


def test_a_refresh_after_the_idle_time_is_refused(stack, directory_db):
    page = Page(stack.gateway_url, "nurse.kim")
    idle_for(directory_db, page.token, IDLE_MS - 60_000)
    assert page.refresh().status_code == 200  # fourteen minutes: still signed in
    idle_for(directory_db, page.token, IDLE_MS + 1_000)
    reply = page.refresh()
    assert reply.status_code == 401 and reply.json()["code"] == "session_idle_expired"
    assert page.refresh().status_code == 401  # and the cookie is gone
    assert session_of(directory_db, page.token)["revoked_reason"] == "idle_timeout"


def test_an_activity_report_after_the_idle_time_does_not_revive_the_session(stack, directory_db):
    page = Page(stack.gateway_url, "nurse.kim")
    idle_for(directory_db, page.token, IDLE_MS + 1_000)
    reply = page.report_activity()
    assert reply.status_code == 401 and reply.json()["code"] == "session_idle_expired"
    assert page.refresh().status_code == 401


def test_an_idle_session_stops_working_everywhere_within_a_minute(stack, directory_db, events, login):
    left_open = Client(stack.gateway_url, "nurse.kim")  # a page left open, or closed without signing out
    colleague = login("dr.reyes")
    for url in (stack.gateway_url, stack.inbox_url):
        assert requests.get(f"{url}/api/v1/messages", headers=bearer(left_open.token), timeout=5).status_code == 200
    with events.listen(SESSION_REVOKED, SECURITY_EVENT) as heard:
        session_id = idle_for(directory_db, left_open.token, IDLE_MS + 1_000)
        idle_at = time.monotonic()
        revoked = heard.wait_for(
            lambda e: e.type == SESSION_REVOKED and e.payload.session_id == session_id, timeout=SWEEP_S + 15
        )
        assert revoked.payload.reason == "idle_timeout"
        # Every service refuses the session's access token (which would otherwise live 15 minutes).
        for url in (stack.inbox_url, stack.gateway_url):
            wait_until(
                lambda url=url: refused_as_revoked(
                    requests.get(f"{url}/api/v1/messages", headers=bearer(left_open.token), timeout=5)
                ),
                timeout=10,
            )
        me = requests.get(f"{stack.directory_url}/api/v1/directory/me", headers=bearer(left_open.token), timeout=5)
        assert refused_as_revoked(me)
        assert time.monotonic() - idle_at < 60
        recorded = heard.wait_for(
            lambda e: e.type == SECURITY_EVENT
            and e.payload.kind == "session_idle_expired"
            and e.payload.target_id == session_id
        )
    assert (recorded.payload.actor_id, recorded.payload.agency_id) == (left_open.staff_id, left_open.agency_id)
    refresh = requests.post(
        f"{stack.gateway_url}/api/v1/auth/refresh", json={"refresh_token": left_open.refresh_token}, timeout=5
    )
    assert refresh.status_code == 401
    # Nobody else was signed out.
    assert colleague.get("/api/v1/messages").status_code == 200
