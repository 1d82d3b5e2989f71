"""Hundreds of open pages' event streams through the gateway, on a stack of their own (its own vhost,
database prefix and processes), with web's caps set low enough to be reached: 300 streams in the
process, 50 per staff member, a heartbeat every second (services/web/README.md, "Live updates").

Every page hears what is for it (an announcement: all of them; a message: the recipient's pages),
a full process refuses the next page with 503 `too_many_streams` and `Retry-After`, a person's newer
page replaces their oldest, and a signed-out session's stream ends within a heartbeat or so.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
import requests

from tests.e2e.conftest import Client
from tests.e2e.fault_stack import private_stack
from tests.live_streams import LiveStreams, Stream
from tests.waits import wait_until

MAX_STREAMS = 300
PER_STAFF = 50
HEARTBEAT_S = 1.0
STAFF = ("admin", "dr.reyes", "nurse.kim", "dr.chen", "intake.wilson", "therapist.hall")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, mongo_uri):
    with private_stack(
        tmp_path_factory.mktemp("live-streams"),
        mongo_uri,
        WEB_MAX_EVENT_STREAMS=str(MAX_STREAMS),
        WEB_MAX_EVENT_STREAMS_PER_STAFF=str(PER_STAFF),
        WEB_EVENTS_HEARTBEAT_S=str(HEARTBEAT_S),
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def people(stack) -> dict[str, Client]:
    return {username: Client(stack.gateway_url, username) for username in STAFF}


@pytest.fixture(scope="module")
def live(stack):
    with LiveStreams(stack.gateway_url) as client:
        yield client


@pytest.fixture(scope="module")
def pages(live, people) -> dict[str, list[Stream]]:
    """Every staff member's 50 pages, all open at once: the process's 300."""
    tokens = [people[username].token for username in STAFF for _ in range(PER_STAFF)]
    opened = live.open(tokens)
    assert [(s.status, s.connected) for s in opened] == [(200, True)] * MAX_STREAMS, {s.status for s in opened}
    return {username: opened[n * PER_STAFF : (n + 1) * PER_STAFF] for n, username in enumerate(STAFF)}


def open_when_a_place_is_free(live: LiveStreams, token: str, deadline_s: float = 30.0) -> Stream:
    """A new page's stream, tried again while the process is full (as the page does after Retry-After)."""
    deadline = time.monotonic() + deadline_s
    while True:
        (stream,) = live.open([token])
        if stream.connected or time.monotonic() > deadline:
            return stream
        assert stream.code == "too_many_streams", stream.body
        time.sleep(0.2)


def test_every_open_page_hears_an_announcement_and_the_recipients_pages_their_message(people, pages):
    everyone = [page for staff in pages.values() for page in staff]
    assert all(page.headers.get("x-correlation-id") for page in everyone)  # the gateway's, echoed by web
    assert all(page.headers["content-type"] == "text/event-stream; charset=utf-8" for page in everyone)
    since = time.monotonic()
    posted = people["admin"].post(
        "/api/v1/announcements", json={"title": f"Fire drill {uuid.uuid4().hex[:6]}", "body": "At 3pm today."}
    )
    assert posted.status_code == 201, posted.text
    wait_until(lambda: all(page.saw("board", '"announcements"', since) for page in everyone), timeout=60)

    since = time.monotonic()
    sent = people["dr.reyes"].send(to_staff_ids=[people["nurse.kim"].staff_id], subject="Live check")
    assert sent.status_code == 201, sent.text
    wait_until(lambda: all(page.saw("board", '"messages"', since) for page in pages["nurse.kim"]), timeout=60)
    # What a page is told is a folder's name and nothing else (no ids, no subject).
    told = [json.loads(event.data) for page in everyone for event in page.events]
    assert all(list(data) == ["folder"] and isinstance(data["folder"], str) for data in told)


def test_a_full_process_refuses_the_next_page_with_retry_after(stack, live, people, pages):
    (refused,) = live.open([Client(stack.gateway_url, "nurse.white").token])
    assert (refused.status, refused.code) == (503, "too_many_streams")
    assert refused.headers["retry-after"] == "30" and refused.headers.get("x-correlation-id")
    assert refused.headers["content-type"].startswith("application/json")


def test_a_newer_page_replaces_the_persons_oldest_even_in_a_full_process(live, people, pages):
    open_before = [page for page in pages["dr.chen"] if not page.ended]
    (newer,) = live.open([people["dr.chen"].token])
    assert newer.connected  # the oldest page's place went to it
    wait_until(lambda: sum(page.ended for page in open_before) == 1, timeout=30)
    (replaced,) = [page for page in open_before if page.ended]
    assert replaced.first("reauthenticate") is None  # ended, not told to sign in again


def test_a_signed_out_sessions_stream_ends_within_a_heartbeat(stack, live, pages):
    gone = pages["intake.wilson"][0]
    live.close([gone])  # a page goes away: its place is free again
    wait_until(lambda: gone.ended, timeout=10)
    everyone = [page for staff in pages.values() for page in staff]
    ended_before = [page.ended for page in everyone]
    session = Client(stack.gateway_url, "nurse.white")
    signed_out = open_when_a_place_is_free(live, session.token)
    assert signed_out.connected
    reply = requests.post(
        f"{stack.gateway_url}/api/v1/auth/logout", json={"refresh_token": session.refresh_token}, timeout=10
    )
    assert reply.status_code == 204
    logged_out = time.monotonic()
    wait_until(lambda: signed_out.ended, timeout=30)
    told = signed_out.first("reauthenticate")
    assert told is not None
    # One heartbeat, plus the revocation reaching web over the bus, with headroom for a busy machine.
    assert told.at - logged_out < HEARTBEAT_S + 10
    assert [page.ended for page in everyone] == ended_before  # only that session's stream ended
