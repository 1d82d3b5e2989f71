"""The web service's own rules: which page hears which delivery, stream limits, sign-in CSRF
checks and the security headers on every answer (the event stream's own server:
tests/unit/test_web_event_server.py)."""

from __future__ import annotations

import re
import threading

import pytest

from clinic.inbox.v1 import inbox_pb2
from services.kit.events import MalformedEvent, new_envelope
from services.kit.settings import SettingsError
from services.web import config
from services.web.http_api import build_app
from services.web.live import BoardChange, BoardEvents, Hub, TooManyStreams, changes_of
from services.web.sessions import DirectorySessions

ORIGIN = "http://127.0.0.1:8000"


def envelope(event_type: str, payload, agency: str = "agy_a"):
    return new_envelope(event_type, payload, agency_id=agency, producer="inbox")


def drain(subscription) -> list[str]:
    return [change.folder for change in subscription.take()]


def test_a_delivery_reaches_only_the_recipients_pages_in_the_events_agency():
    hub = Hub(max_streams=10, max_streams_per_staff=3)
    events = BoardEvents.__new__(BoardEvents)
    events.hub = hub
    mine, same_id_other_agency, colleague = (
        hub.subscribe("agy_a", "stf_1"),
        hub.subscribe("agy_b", "stf_1"),
        (hub.subscribe("agy_a", "stf_2")),
    )
    events.handle(
        envelope("message.delivered.v1", inbox_pb2.MessageDelivered(recipient_staff_id="stf_1", board_kind="portal"))
    )
    events.handle(
        envelope("board_item.delivered.v1", inbox_pb2.BoardItemDelivered(recipient_staff_id="stf_1", board_kind="lab"))
    )
    assert drain(mine) == ["portal", "lab"]
    assert drain(same_id_other_agency) == [] and drain(colleague) == []


def test_an_announcement_reaches_every_page_of_its_agency_only():
    hub = Hub(max_streams=10, max_streams_per_staff=3)
    events = BoardEvents.__new__(BoardEvents)
    events.hub = hub
    a1, a2, b1 = hub.subscribe("agy_a", "stf_1"), hub.subscribe("agy_a", "stf_2"), hub.subscribe("agy_b", "stf_3")
    events.handle(envelope("announcement.posted.v1", inbox_pb2.AnnouncementPosted(announcement_id="ann_1")))
    assert drain(a1) == drain(a2) == ["announcements"]
    assert drain(b1) == []


@pytest.mark.parametrize(
    "event",
    [
        ("board_item.delivered.v1", inbox_pb2.BoardItemDelivered(board_kind="lab")),  # no recipient
        ("message.delivered.v1", inbox_pb2.AnnouncementPosted()),  # wrong payload type
        ("staff.created.v1", inbox_pb2.AnnouncementPosted()),  # not a delivery
    ],
)
def test_malformed_delivery_events_are_refused_for_parking(event):
    with pytest.raises(MalformedEvent):
        list(changes_of(envelope(*event)))


def test_an_event_without_an_agency_is_refused():
    events = BoardEvents.__new__(BoardEvents)
    events.hub = Hub(10, 3)
    with pytest.raises(MalformedEvent):
        events.handle(envelope("announcement.posted.v1", inbox_pb2.AnnouncementPosted(), agency=""))


def test_a_person_over_their_limit_loses_their_oldest_stream_and_the_process_limit_refuses():
    hub = Hub(max_streams=3, max_streams_per_staff=2)
    first, second = hub.subscribe("agy_a", "stf_1"), hub.subscribe("agy_a", "stf_1")
    third = hub.subscribe("agy_a", "stf_1")
    assert first.ended and not second.ended and not third.ended
    assert hub.streams == 2
    hub.subscribe("agy_a", "stf_2")
    with pytest.raises(TooManyStreams):
        hub.subscribe("agy_a", "stf_3")
    second.close()
    assert hub.streams == 2
    hub.publish_to_staff("agy_a", "stf_1", BoardChange("messages"))
    assert drain(third) == ["messages"] and drain(second) == []


def test_closing_the_hub_ends_every_stream_and_waits_for_them_to_finish():
    """Pushes run where the hub delivers (the event stream server's loop): here a thread standing in
    for it, so `close` has to wait for the streams to finish there."""
    jobs: list = []
    delivered = threading.Event()
    hub = Hub(10, 3, deliver=jobs.append)
    streams = [hub.subscribe("agy_a", f"stf_{i}") for i in range(3)]
    for subscription in streams:  # what the stream does once ended: lets go of its place
        subscription.listener = lambda s=subscription: s.close() if s.ended else None

    def loop():
        while not jobs:
            delivered.wait(0.01)
        jobs.pop()()

    worker = threading.Thread(target=loop)
    worker.start()
    hub.close(wait_s=10.0)
    worker.join(5)
    assert all(s.ended for s in streams)
    assert hub.streams == 0  # returned once the last stream had finished, not after the 10 s


def test_a_publish_reaches_the_streams_in_one_delivery_whatever_their_number():
    jobs: list = []
    hub = Hub(100, 3, deliver=jobs.append)
    pages = [hub.subscribe("agy_a", f"stf_{i}") for i in range(50)]
    assert hub.publish_to_agency("agy_a", BoardChange("announcements")) == 50
    assert hub.publish_to_staff("agy_a", "stf_7", BoardChange("messages")) == 1
    assert hub.publish_to_staff("agy_a", "stf_nobody", BoardChange("messages")) == 0
    assert len(jobs) == 2 and all(drain(page) == [] for page in pages)  # nothing pushed before it runs
    for job in jobs:
        job()
    assert drain(pages[7]) == ["announcements", "messages"]
    assert all(drain(page) == ["announcements"] for page in pages[:7] + pages[8:])


def test_a_page_far_behind_keeps_only_the_backlog():
    from services.web.live import SUBSCRIBER_BACKLOG

    hub = Hub(10, 3)
    page = hub.subscribe("agy_a", "stf_1")
    for _ in range(SUBSCRIBER_BACKLOG + 10):
        hub.publish_to_staff("agy_a", "stf_1", BoardChange("messages"))
    assert len(drain(page)) == SUBSCRIBER_BACKLOG


@pytest.fixture
def client():
    settings = config.load({"WEB_ALLOWED_ORIGINS": ORIGIN, "CLINIC_RUN_DIR": "/tmp"})
    # Directory is unreachable: anything that gets past the checks answers 503.
    sessions = DirectorySessions("http://127.0.0.1:9", settings.refresh_cookie_max_age_s)
    app = build_app(sessions, Hub(4, 2), verifier=None, settings=settings)
    return app.test_client()


@pytest.mark.parametrize(
    "headers",
    [
        {},  # no CSRF header
        {"X-Clinic-CSRF": "1"},  # no Origin and no Sec-Fetch-Site
        {"X-Clinic-CSRF": "1", "Origin": "https://evil.example"},
        {"X-Clinic-CSRF": "0", "Origin": ORIGIN},
        {"Origin": ORIGIN},
        {"X-Clinic-CSRF": "1", "Sec-Fetch-Site": "cross-site"},
    ],
)
@pytest.mark.parametrize("path", ["/app/session", "/app/session/refresh", "/app/session/logout"])
def test_cookie_using_endpoints_refuse_requests_another_site_could_make(client, path, headers):
    client.set_cookie("clinic_refresh", "a-refresh-token", path="/app/session")
    response = client.post(path, json={"username": "u", "password": "p"}, headers=headers)
    assert response.status_code == 403
    assert response.get_json()["code"] == "csrf_refused"


@pytest.mark.parametrize(
    "headers", [{"X-Clinic-CSRF": "1", "Origin": ORIGIN}, {"X-Clinic-CSRF": "1", "Sec-Fetch-Site": "same-origin"}]
)
def test_same_origin_requests_pass_the_checks(client, headers):
    response = client.post("/app/session", json={"username": "u", "password": "p"}, headers=headers)
    assert response.status_code == 503  # past the checks, to the (unreachable) directory
    assert response.get_json()["code"] == "directory_unavailable"


def test_refresh_without_a_cookie_is_401_not_signed_in(client):
    response = client.post("/app/session/refresh", headers={"X-Clinic-CSRF": "1", "Origin": ORIGIN})
    assert response.status_code == 401
    assert response.get_json()["code"] == "not_signed_in"


def test_the_pages_check_on_load_without_a_cookie_is_204_not_an_error(client):
    response = client.post("/app/session/refresh?probe=1", headers={"X-Clinic-CSRF": "1", "Origin": ORIGIN})
    assert response.status_code == 204
    assert response.data == b""


def test_sign_in_with_wrong_types_is_400_and_malformed_json_is_400(client):
    headers = {"X-Clinic-CSRF": "1", "Origin": ORIGIN}
    typed = client.post("/app/session", json={"username": {"$gt": ""}, "password": "p"}, headers=headers)
    assert typed.status_code == 400 and typed.get_json()["code"] == "invalid_type"
    broken = client.post("/app/session", data="{", content_type="application/json", headers=headers)
    assert broken.status_code == 400 and broken.get_json()["code"] == "malformed_json"


def test_the_event_stream_is_not_served_by_the_flask_app(client):
    """It has a server of its own (services.web.event_server, tests/unit/test_web_event_server.py)."""
    response = client.get("/app/events")
    assert response.status_code == 404 and response.get_json()["code"] == "not_found"


def test_the_page_and_its_assets_carry_the_security_headers(client):
    for path in ("/", "/static/js/app.js", "/static/app.css", "/no-such-page"):
        response = client.get(path)
        csp = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert "object-src 'none'" in csp and "base-uri 'none'" in csp and "connect-src 'self'" in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
    assert client.get("/").status_code == 200
    assert client.get("/static/js/app.js").headers["Content-Type"].startswith("text/javascript")
    missing = client.get("/no-such-page")
    assert missing.status_code == 404 and missing.get_json()["code"] == "not_found"


def test_the_page_has_no_inline_script_or_style():
    from services.web.http_api import STATIC_DIR

    html = (STATIC_DIR / "index.html").read_text()
    assert "<script>" not in html and "<style" not in html and " style=" not in html
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers
    for script in (STATIC_DIR / "js").glob("*.js"):
        assert "innerHTML" not in script.read_text(), script.name


def test_production_needs_the_page_origin_and_the_broker():
    with pytest.raises(SettingsError) as refused:
        config.load({"CLINIC_MODE": "production"})
    assert any("WEB_ALLOWED_ORIGINS" in p for p in refused.value.problems)
    assert any("AMQP_URL" in p for p in refused.value.problems)
    with pytest.raises(SettingsError):
        config.load({"WEB_ALLOWED_ORIGINS": "127.0.0.1:8000"})
    with pytest.raises(SettingsError):
        config.load({"WEB_EVENTS_PORT": "http"})


def test_streams_no_longer_count_against_the_http_threads():
    settings = config.load({"WEB_HTTP_THREADS": "8", "WEB_MAX_EVENT_STREAMS": "2000", "CLINIC_RUN_DIR": "/tmp"})
    assert settings.max_streams == 2000 and settings.http_threads == 8
    defaults = config.load({"CLINIC_RUN_DIR": "/tmp"})
    assert defaults.max_streams >= 2000 and defaults.events_port == 8109


def test_readiness_follows_the_delivery_event_consumer():
    settings = config.load({"WEB_ALLOWED_ORIGINS": ORIGIN, "CLINIC_RUN_DIR": "/tmp"})
    consuming = {"now": False}
    app = build_app(DirectorySessions("http://127.0.0.1:9", 300), Hub(4, 2), None, settings, lambda: consuming["now"])
    client = app.test_client()
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200
    consuming["now"] = True
    assert client.get("/readyz").get_json()["status"] == "ready"


@pytest.mark.parametrize(
    ("https_only", "forwarded", "secure"), [(True, "http", True), (False, "https", True), (False, "http", False)]
)
def test_the_refresh_cookie_is_secure_whenever_the_page_is_served_over_https(https_only, forwarded, secure):
    """A page only served over https gets a Secure cookie even if one hop reports plain http."""
    import requests
    from flask import Flask

    sessions = DirectorySessions("http://127.0.0.1:9", 300, https_only=https_only)
    answer = requests.Response()
    answer.status_code = 200
    answer._content = b'{"access_token": "a", "refresh_token": "r", "expires_in": 900}'
    with Flask(__name__).test_request_context("/app/session", headers={"X-Forwarded-Proto": forwarded}):
        cookie = sessions._grant(answer).headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/app/session" in cookie
    assert ("Secure" in cookie) is secure


def test_a_stopping_process_opens_no_new_streams():
    hub = Hub(10, 3)
    hub.close(wait_s=0.1)
    with pytest.raises(TooManyStreams):
        hub.subscribe("agy_a", "stf_1")
    assert hub.streams == 0
