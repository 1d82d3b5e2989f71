"""The staging helpers' wake-up signal and the relay's idle wait, without a database or broker."""

from __future__ import annotations

import threading
import time

import pytest

from clinic.inbox.v1.inbox_pb2 import MessageDelivered
from services.kit import outbox
from services.kit.events import new_envelope
from services.kit.outbox import OutboxRelay, outbox_fields, outbox_update, release_update, with_outbox


def event(event_id: str):
    return new_envelope(
        "message.delivered.v1", MessageDelivered(message_id="m"), agency_id="a", producer="inbox", event_id=event_id
    )


class IdlePublisher:
    """Counts the relay's calls to service its connection."""

    def __init__(self):
        self.idled: list[float] = []

    def publish_batch(self, envelopes):
        return {envelope.event_id for envelope in envelopes}

    def idle(self, seconds):
        self.idled.append(seconds)
        time.sleep(seconds)


class NoDatabase(dict):
    def __missing__(self, name):
        return name


def relay(poll_interval_s: float = 0.2) -> OutboxRelay:
    return OutboxRelay(NoDatabase(), ["items"], IdlePublisher(), poll_interval_s=poll_interval_s)


@pytest.mark.parametrize(
    "stage",
    [
        lambda: outbox_fields([event("e1")]),
        lambda: outbox_update([event("e1")]),
        lambda: with_outbox({"$set": {"state": "sent"}}, [event("e1")]),
        release_update,
    ],
    ids=["fields", "update", "with_outbox", "release"],
)
def test_staging_due_events_bumps_the_generation(stage):
    before = outbox._staged.generation
    stage()
    assert outbox._staged.generation == before + 1
    assert time.monotonic() - outbox._staged.at < 5


@pytest.mark.parametrize(
    "stage",
    [
        lambda: outbox_fields([event("e1")], ready=False),
        lambda: outbox_update([event("e1")], ready=False),
        lambda: outbox_fields([]),
        lambda: outbox_update([]),
    ],
    ids=["held-fields", "held-update", "no-fields", "no-update"],
)
def test_staging_nothing_due_wakes_nobody(stage):
    before = outbox._staged.generation
    stage()
    assert outbox._staged.generation == before


def test_wait_returns_when_another_thread_stages():
    seen = outbox._staged.generation
    timer = threading.Timer(0.05, lambda: outbox_fields([event("e1")]))
    started = time.monotonic()
    timer.start()
    try:
        assert outbox._staged.wait(seen, 10.0) == seen + 1
    finally:
        timer.cancel()
    assert time.monotonic() - started < 5


def test_wait_without_staging_times_out_with_the_same_generation():
    seen = outbox._staged.generation
    assert outbox._staged.wait(seen, 0.02) == seen
    assert outbox._staged.wait(seen - 1, 10.0) == seen  # already moved on: at once


def test_a_wakeable_idle_ends_at_the_staging_and_a_plain_one_does_not():
    woken = relay(poll_interval_s=30.0)
    stop = threading.Event()
    timer = threading.Timer(0.05, lambda: outbox_fields([event("e1")]))
    timer.start()
    started = time.monotonic()
    woken._idle(stop, 10.0, wake=True)
    assert time.monotonic() - started < 5
    timer.join()

    plain = relay()
    timer = threading.Timer(0.01, lambda: outbox_fields([event("e2")]))
    timer.start()
    started = time.monotonic()
    plain._idle(stop, 0.3)
    assert time.monotonic() - started >= 0.29
    timer.join()


def test_a_wakeable_idle_still_services_the_broker_connection():
    idle = relay(poll_interval_s=30.0)
    idle._idle(threading.Event(), 0.35, wake=True)
    assert idle._publisher.idled  # at least once per IDLE_SLICE_S
    assert all(seconds <= outbox.SERVICE_S for seconds in idle._publisher.idled)


def test_a_stopped_relay_does_not_wait_for_a_staging():
    stop = threading.Event()
    stop.set()
    started = time.monotonic()
    relay()._idle(stop, 10.0, wake=True)
    assert time.monotonic() - started < 1


def test_after_a_recent_staging_an_empty_pass_is_followed_up_sooner_than_the_poll(monkeypatch):
    monkeypatch.setattr(outbox._staged, "at", time.monotonic())  # staged just now
    quiet = relay(poll_interval_s=30.0)
    delays = [quiet._quiet_idle_s() for _ in range(16)]
    assert delays[:4] == [0.002, 0.004, 0.008, 0.016]
    assert delays == sorted(delays)  # doubling ...
    assert delays[-2:] == [30.0, 30.0]  # ... up to the poll

    monkeypatch.setattr(outbox._staged, "at", float("-inf"))  # nothing staged lately: just the poll
    assert relay(poll_interval_s=30.0)._quiet_idle_s() == 30.0


def test_with_the_wake_up_turned_off_the_relay_only_polls(monkeypatch):
    monkeypatch.setattr(outbox._staged, "at", time.monotonic())
    off = OutboxRelay(NoDatabase(), ["items"], IdlePublisher(), poll_interval_s=0.3, wake=False)
    assert off._quiet_idle_s() == 0.3
    timer = threading.Timer(0.01, lambda: outbox_fields([event("e3")]))
    timer.start()
    started = time.monotonic()
    off._idle(threading.Event(), 0.3, wake=True)
    assert time.monotonic() - started >= 0.29
    timer.join()


@pytest.mark.parametrize(("value", "expected"), [("false", False), ("true", True), (None, True)])
def test_the_wake_up_follows_the_environment_by_default(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("OUTBOX_RELAY_WAKE_UP", raising=False)
    else:
        monkeypatch.setenv("OUTBOX_RELAY_WAKE_UP", value)
    assert relay()._wake is expected
