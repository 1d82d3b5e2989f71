"""The page's event stream on its own server (services.web.event_server): the kit's refusals, the
stream's lines, the caps, and the token checked before every line, in-process with real tokens."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from services.kit.auth import AUDIENCE, ISSUER, RevokedSessions, StaticKeySource, TokenVerifier
from services.kit.http import parse_networks
from services.web.event_server import SWEEP_S, EventStreamServer
from services.web.http_api import CONTENT_SECURITY_POLICY, STRICT_TRANSPORT_SECURITY
from services.web.live import BoardChange, Hub
from tests.live_streams import LiveStreams
from tests.waits import wait_until

HEARTBEAT_S = 0.3
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def token(staff: str = "stf_1", agency: str = "agy_a", *, sid: str = "", ttl_s: int = 900, kind: str = "staff") -> str:
    now = int(time.time())
    claims = {"sub": staff, "agency_id": agency, "typ": "access", "kind": kind, "iat": now, "exp": now + ttl_s}
    claims |= {"iss": ISSUER, "aud": AUDIENCE, "sid": sid or f"ses_{staff}", "roles": ["staff"]}
    return jwt.encode(claims, KEY, algorithm="RS256", headers={"kid": "k1"})


class Running:
    def __init__(self, max_streams: int = 20, per_staff: int = 2, leeway_s: int = 30, heartbeat_s: float = HEARTBEAT_S):
        self.revoked = RevokedSessions()
        self.hub = Hub(max_streams, per_staff)
        verifier = TokenVerifier(StaticKeySource(lambda: {"k1": KEY.public_key()}), self.revoked, leeway_s=leeway_s)
        settings = SimpleNamespace(
            events_heartbeat_s=heartbeat_s,
            trusted_proxies=parse_networks("127.0.0.1/32"),
            http_host="127.0.0.1",
            events_port=0,
        )
        self.server = EventStreamServer(self.hub, verifier, settings)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.server.run, args=(self.stop,), daemon=True)
        self.thread.start()
        assert self.server.wait_listening(10)
        self.url = f"http://127.0.0.1:{self.server.port}"

    def revoke(self, sid: str) -> None:
        self.revoked.revoke(sid, int(time.time() * 1000) + 900_000)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.fixture
def running():
    server = Running()
    yield server
    server.close()


@pytest.fixture
def live(running):
    with LiveStreams(running.url) as client:
        yield client


def lines(read, count: int) -> list[str]:
    return [next(read) for _ in range(count)]


def test_a_stream_carries_the_pages_headers_and_only_folder_names(running):
    with requests.get(
        f"{running.url}/app/events",
        headers={"Authorization": f"Bearer {token()}", "X-Correlation-ID": "corr-1"},
        stream=True,
        timeout=10,
    ) as reply:
        assert reply.status_code == 200
        assert reply.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert reply.headers["Cache-Control"] == "no-store" and reply.headers["X-Accel-Buffering"] == "no"
        assert reply.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert reply.headers["X-Content-Type-Options"] == "nosniff" and reply.headers["X-Frame-Options"] == "DENY"
        assert reply.headers["X-Correlation-ID"] == "corr-1"
        assert "Strict-Transport-Security" not in reply.headers  # plain HTTP
        read = reply.iter_lines(decode_unicode=True)  # one reader: closing one closes the connection
        assert lines(read, 3) == ["retry: 2000", ": connected", ""]
        assert running.hub.publish_to_staff("agy_a", "stf_1", BoardChange("lab")) == 1
        assert running.hub.publish_to_agency("agy_a", BoardChange("announcements")) == 1
        told = []
        while len(told) < 4:
            line = next(read)
            if line.startswith(("event:", "data:")):  # not heartbeats, not the blank lines ending blocks
                told.append(line)
        assert told == ["event: board", 'data: {"folder": "lab"}', "event: board", 'data: {"folder": "announcements"}']


def test_a_quiet_stream_sends_heartbeats(running, live):
    (page,) = live.open([token()])
    wait_until(lambda: page.heartbeats >= 2, timeout=10)
    assert not page.ended and page.events == []


def test_hsts_when_the_trusted_hop_says_the_page_came_over_https(running):
    reply = requests.get(f"{running.url}/app/events", headers={"X-Forwarded-Proto": "https"}, timeout=10)
    assert reply.headers["Strict-Transport-Security"] == STRICT_TRANSPORT_SECURITY


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "code"),
    [
        ("GET", "/app/events", {}, 401, "unauthenticated"),
        ("GET", "/app/events", {"Authorization": "Bearer not-a-token"}, 401, "invalid_token"),
        ("GET", "/app/events", {"Authorization": "Basic dXNlcjpwYXNz"}, 401, "unauthenticated"),
        ("GET", "/app/events?q=%00", {}, 400, "invalid_text"),
        ("GET", "/app/events/%ED%A0%80", {}, 400, "invalid_text"),
        ("GET", "/app/eventsx", {}, 404, "not_found"),
        ("GET", "/app/events/", {}, 404, "not_found"),
        ("POST", "/app/events", {}, 405, "method_not_allowed"),
        ("DELETE", "/app/events", {}, 405, "method_not_allowed"),
    ],
)
def test_refusals_are_the_kits_json_errors(running, method, path, headers, status, code):
    reply = requests.request(method, f"{running.url}{path}", headers=headers, timeout=10)
    assert (reply.status_code, reply.json()["code"]) == (status, code)
    assert reply.json()["message"] and reply.headers["Content-Type"] == "application/json"
    assert reply.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY and reply.headers["X-Correlation-ID"]
    if status == 401:
        assert reply.headers["WWW-Authenticate"] == 'Bearer realm="clinic"'
    if status == 405:
        assert reply.headers["Allow"] == "GET, HEAD, OPTIONS"


def test_the_stream_is_for_staff_of_an_agency(running):
    service = requests.get(
        f"{running.url}/app/events", headers={"Authorization": f"Bearer {token(kind='service')}"}, timeout=10
    )
    assert (service.status_code, service.json()["code"]) == (403, "forbidden")
    platform = requests.get(
        f"{running.url}/app/events",
        headers={"Authorization": f"Bearer {token('svc:audit', '', kind='service')}"},
        timeout=10,
    )
    assert (platform.status_code, platform.json()["code"]) == (403, "agency_scope_required")
    assert running.hub.streams == 0


def test_answers_keep_the_connection_for_the_next_request(running):
    with requests.Session() as session:
        for _ in range(3):
            assert session.get(f"{running.url}/app/events", timeout=10).status_code == 401
        assert len(running.server.connections) == 1


def test_a_newer_page_replaces_the_oldest_and_a_full_process_refuses_with_retry_after(live):
    (first,) = live.open([token("stf_1")])
    (second,) = live.open([token("stf_1")])
    assert first.connected and second.connected
    (third,) = live.open([token("stf_1")])  # over the person's 2: their oldest page's stream ends
    wait_until(lambda: first.ended, timeout=10)
    assert third.connected and not second.ended and first.events == []


def test_the_process_cap_answers_503_with_retry_after():
    running = Running(max_streams=3, per_staff=2)
    try:
        with LiveStreams(running.url) as live:
            pages = live.open([token("stf_1"), token("stf_2"), token("stf_3")])
            assert all(page.connected for page in pages)
            (refused,) = live.open([token("stf_4")])
            assert (refused.status, refused.code) == (503, "too_many_streams")
            assert refused.headers["retry-after"] == "30" and json.loads(refused.body)["message"]
            live.close(pages[:1])  # a page goes away: its place is free again
            wait_until(lambda: running.hub.streams == 2, timeout=10)
            (admitted,) = live.open([token("stf_4")])
            assert admitted.connected
    finally:
        running.close()


def test_revocation_ends_a_busy_stream_before_its_next_line_and_a_quiet_one_within_a_heartbeat(running, live):
    busy, quiet, colleague = live.open([token("stf_1", sid="ses_busy"), token("stf_2"), token("stf_3")])
    running.revoke("ses_busy")
    running.hub.publish_to_staff("agy_a", "stf_1", BoardChange("messages"))  # changes keep coming
    wait_until(lambda: busy.ended, timeout=10)
    assert [e.name for e in busy.events] == ["reauthenticate"]  # never told of the change
    revoked_at = time.monotonic()
    running.revoke("ses_stf_2")
    wait_until(lambda: quiet.ended, timeout=10)
    assert quiet.first("reauthenticate").at - revoked_at < HEARTBEAT_S + 10  # headroom for a busy machine
    assert not colleague.ended and running.hub.streams == 1


def test_a_signed_out_sessions_quiet_stream_ends_within_about_a_second_not_a_heartbeat():
    running = Running(heartbeat_s=60.0)
    try:
        with LiveStreams(running.url) as live:
            (page,) = live.open([token(sid="ses_quiet")])
            revoked_at = time.monotonic()
            running.revoke("ses_quiet")
            wait_until(lambda: page.ended, timeout=20)
            told = page.first("reauthenticate")
            assert told is not None and told.at - revoked_at < SWEEP_S + 10  # headroom for a busy machine
            assert page.heartbeats == 0  # ended long before its first heartbeat was due
    finally:
        running.close()


def test_an_expired_token_ends_the_stream_within_a_heartbeat():
    running = Running(leeway_s=0)
    try:
        with LiveStreams(running.url) as live:
            (page,) = live.open([token(ttl_s=1)])
            assert page.connected
            wait_until(lambda: page.ended, timeout=15)
            assert [e.name for e in page.events] == ["reauthenticate"]
            assert running.hub.streams == 0
    finally:
        running.close()


def test_a_page_that_goes_away_lets_go_of_its_place(running, live):
    pages = live.open([token(f"stf_{n}") for n in range(5)])
    assert running.hub.streams == 5
    live.close(pages)
    wait_until(lambda: running.hub.streams == 0, timeout=10)


def test_hundreds_of_streams_are_each_told_of_an_announcement_once(running):
    many = Running(max_streams=400, per_staff=1)
    try:
        with LiveStreams(many.url) as live:
            pages = live.open([token(f"stf_{n}") for n in range(300)])
            assert all(page.connected for page in pages) and many.hub.streams == 300
            many.hub.publish_to_agency("agy_a", BoardChange("announcements"))
            wait_until(lambda: all(page.saw("board", "announcements") for page in pages), timeout=30)
            assert all(len(page.events) == 1 for page in pages)
    finally:
        many.close()


def test_closing_the_hub_ends_every_stream_and_refuses_new_ones(running, live):
    pages = live.open([token(f"stf_{n}") for n in range(3)])
    running.hub.close(wait_s=10)
    assert running.hub.streams == 0
    wait_until(lambda: all(page.ended for page in pages), timeout=10)
    assert all(page.events == [] for page in pages)  # ended, not told to sign in again
    (late,) = live.open([token("stf_9")])
    assert (late.status, late.code) == (503, "too_many_streams")
