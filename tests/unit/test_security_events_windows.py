"""The pure parts behind bounded security recording: `OncePerWindow` (the first of a key in its
window is recorded, the rest counted), `log_suppressed` (a few log lines per burst) and
`address_group` (an IPv6 address counts by its /64)."""

from __future__ import annotations

import logging
import threading

import pytest

from services.kit.http import address_group
from services.kit.security_events import ACTOR_KINDS, OncePerWindow, log_suppressed, security_event
from tests.helpers import Clock


def test_the_first_of_a_key_in_its_window_is_admitted_and_the_rest_counted():
    clock = Clock()
    window = OncePerWindow(60.0, clock=clock)
    assert [window.admit(("203.0.113.9", "bad", "/r")) for _ in range(4)] == [0, 1, 2, 3]
    assert window.admit(("203.0.113.9", "other", "/r")) == 0
    clock.advance(59.9)
    assert window.admit(("203.0.113.9", "bad", "/r")) == 4
    clock.advance(0.2)  # the window is over: the next one is recorded again
    assert window.admit(("203.0.113.9", "bad", "/r")) == 0


def test_the_table_is_bounded():
    window = OncePerWindow(60.0, max_keys=8, clock=Clock())
    for n in range(1000):
        window.admit(n)
    assert len(window._windows) == 8


def test_many_keys_are_admitted_up_to_the_budget_of_the_window():
    clock = Clock()
    window = OncePerWindow(60.0, max_keys=100, max_records=50, clock=clock)
    answers = [window.admit(f"2001:db8:{n:x}::/64") for n in range(5000)]  # an attacker with many /64s
    assert answers.count(0) == 50
    assert answers[50:53] == [1, 2, 3]  # counted for the log
    clock.advance(60.0)
    assert window.admit("2001:db8:ffff::/64") == 0  # a new window, a new budget


def test_threads_admit_one_first_occurrence():
    window = OncePerWindow(60.0)
    firsts = []

    def hammer():
        for _ in range(200):
            if window.admit("k") == 0:
                firsts.append(1)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert firsts == [1]


def test_suppressed_occurrences_are_logged_at_powers_of_ten(caplog):
    with caplog.at_level(logging.WARNING, logger="services.kit.security_events"):
        for n in range(0, 1200):
            log_suppressed("forged_identity_refused", n, code="gateway_identity_required", route="/r")
    assert [r.count for r in caplog.records] == [1, 10, 100, 1000]
    assert {r.security_kind for r in caplog.records} == {"forged_identity_refused"}


@pytest.mark.parametrize(
    ("address", "group"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::FFFF", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:198.51.100.7", "198.51.100.7"),  # an IPv4 client on a dual-stack socket
        ("", ""),
        ("not-an-address", "not-an-address"),
    ],
)
def test_address_groups(address, group):
    assert address_group(address) == group


def test_an_operator_is_an_actor_kind():
    assert "operator" in ACTOR_KINDS
    event = security_event("key_rotated", service="inbox", actor_kind="operator", outcome="succeeded")
    assert event.producer == "inbox"
