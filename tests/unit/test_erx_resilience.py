"""The circuit breaker of a vendor's API root, Retry-After parsing and the sync's backoff."""

from __future__ import annotations

import datetime as dt
import email.utils
import threading

import pytest

from services.erx_bridge.resilience import (
    CircuitBreaker,
    CircuitBreakers,
    CircuitOpen,
    CircuitState,
    backoff_s,
    parse_retry_after,
)
from services.erx_bridge.vendors.base import VendorMalformed, VendorRejected, VendorUnavailable
from tests.helpers import Clock
from tests.waits import wait_until


def fail(breaker: CircuitBreaker, error: Exception | None = None) -> None:
    with pytest.raises(type(error or VendorUnavailable("down"))), breaker.guard():
        raise error or VendorUnavailable("down")


def succeed(breaker: CircuitBreaker) -> None:
    with breaker.guard():
        pass


def test_defaults_are_five_failures_and_thirty_seconds():
    breaker = CircuitBreaker()
    assert (breaker.failure_threshold, breaker.cooldown_s) == (5, 30.0)


def test_the_circuit_opens_after_n_consecutive_failures_and_fails_fast():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=30.0, clock=clock)
    for _ in range(2):
        fail(breaker)
    assert breaker.state is CircuitState.CLOSED
    fail(breaker, VendorMalformed("unreadable"))  # an unreadable answer is a failure too
    assert breaker.state is CircuitState.OPEN
    clock.advance(12)
    ran = []
    with pytest.raises(CircuitOpen) as raised, breaker.guard():
        ran.append(True)
    assert not ran  # the vendor was not asked
    assert isinstance(raised.value, VendorUnavailable)
    assert raised.value.retry_after_s == pytest.approx(18.0)


def test_failures_must_be_consecutive():
    breaker = CircuitBreaker(failure_threshold=3, clock=Clock())
    for _ in range(5):
        fail(breaker)
        fail(breaker)
        succeed(breaker)
    assert breaker.state is CircuitState.CLOSED and breaker.consecutive_failures == 0


def test_a_rejection_proves_the_vendor_is_up():
    breaker = CircuitBreaker(failure_threshold=2, clock=Clock())
    fail(breaker)
    fail(breaker, VendorRejected("bad clinic key"))
    fail(breaker)
    assert breaker.state is CircuitState.CLOSED


def test_after_the_cooldown_one_trial_goes_through_and_its_success_closes_the_circuit():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=30.0, clock=clock)
    fail(breaker)
    clock.advance(29.9)
    assert breaker.state is CircuitState.OPEN
    clock.advance(0.1)
    assert breaker.state is CircuitState.HALF_OPEN
    with breaker.guard():
        # While the trial runs, everybody else still fails fast.
        with pytest.raises(CircuitOpen), breaker.guard():
            pass
    assert breaker.state is CircuitState.CLOSED
    succeed(breaker)
    succeed(breaker)


def test_a_failed_trial_opens_the_circuit_for_a_new_cooldown():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=10.0, clock=clock)
    fail(breaker)
    fail(breaker)
    clock.advance(10)
    fail(breaker)  # the trial
    assert breaker.state is CircuitState.OPEN
    clock.advance(9)
    with pytest.raises(CircuitOpen) as raised, breaker.guard():
        pass
    assert raised.value.retry_after_s == pytest.approx(1.0)
    clock.advance(1)
    succeed(breaker)
    assert breaker.state is CircuitState.CLOSED


def test_an_unexpected_error_counts_and_an_interruption_frees_the_trial():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5.0, clock=clock)
    fail(breaker, RuntimeError("bug"))
    assert breaker.state is CircuitState.OPEN
    clock.advance(5)
    with pytest.raises(KeyboardInterrupt), breaker.guard():
        raise KeyboardInterrupt
    succeed(breaker)  # the trial slot was released, not held forever
    assert breaker.state is CircuitState.CLOSED


def test_only_one_of_many_threads_makes_the_trial():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=1.0, clock=clock)
    fail(breaker)
    clock.advance(1)
    start, release = threading.Barrier(20), threading.Event()
    admitted, refused = [], []

    def caller():
        start.wait()
        try:
            breaker.before_call()
        except CircuitOpen:
            refused.append(1)
            return
        admitted.append(1)
        release.wait(5)
        breaker.record_success()

    threads = [threading.Thread(target=caller) for _ in range(20)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(admitted) + len(refused) == 20, message="every caller admitted or refused")
    release.set()
    for thread in threads:
        thread.join(5)
    assert (len(admitted), len(refused)) == (1, 19)
    assert breaker.state is CircuitState.CLOSED


def test_breakers_are_per_api_root():
    clock = Clock()
    breakers = CircuitBreakers(failure_threshold=1, cooldown_s=30, clock=clock)
    one = breakers.for_key("https://my.staging.dosespot.com/webapi/v2")
    assert breakers.for_key("https://MY.staging.dosespot.com/webapi/v2/") is one
    other = breakers.for_key("https://my.dosespot.com/webapi/v2")
    fail(one)
    assert one.state is CircuitState.OPEN and other.state is CircuitState.CLOSED
    assert (one.failure_threshold, one.cooldown_s) == (1, 30)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(cooldown_s=-1)


# -- Retry-After ---------------------------------------------------------------------------------


def test_retry_after_in_seconds_or_as_an_http_date():
    now = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert parse_retry_after("7", now=now) == 7.0
    assert parse_retry_after(" 120 ", now=now) == 120.0
    later = email.utils.format_datetime(now + dt.timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(later, now=now) == 90.0
    earlier = email.utils.format_datetime(now - dt.timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(earlier, now=now) == 0.0
    for unreadable in (None, "", "  ", "soon", "-5", "1.5e3", "Fri, 99 Foo 2026"):
        assert parse_retry_after(unreadable, now=now) is None


# -- backoff -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("attempt", "ceiling"), [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (9, 256.0), (10, 300.0)])
def test_backoff_is_exponential_with_equal_jitter_under_a_cap(attempt, ceiling):
    assert backoff_s(attempt, rand=lambda: 0.0) == pytest.approx(ceiling / 2)
    assert backoff_s(attempt, rand=lambda: 1.0) == pytest.approx(ceiling)
    assert backoff_s(attempt, rand=lambda: 0.5) == pytest.approx(ceiling * 0.75)


def test_backoff_never_waits_less_than_retry_after_even_past_the_cap():
    assert backoff_s(1, 7.0, rand=lambda: 0.0) == 7.0
    assert backoff_s(1, 7.0, rand=lambda: 0.999) < 7.0 + 1.4  # jitter: max(base 1 s, 20% of 7 s)
    assert backoff_s(1, 2.0, rand=lambda: 0.999) < 2.0 + 1.0  # ... the base when 20% is less
    assert backoff_s(5, 600.0, rand=lambda: 0.0) == 600.0  # the vendor's word beats the cap
    assert backoff_s(5, 600.0, rand=lambda: 1.0) == pytest.approx(720.0)
    assert 0.0 <= backoff_s(3, 0.0, rand=lambda: 0.5) <= 1.0


def test_real_jitter_stays_in_bounds_and_spreads():
    waits = [backoff_s(4) for _ in range(300)]
    assert all(4.0 <= wait <= 8.0 for wait in waits)
    assert len({round(wait, 3) for wait in waits}) > 100
    after_retry = [backoff_s(2, 30.0) for _ in range(300)]
    assert all(30.0 <= wait < 36.0 for wait in after_retry)
    assert max(after_retry) - min(after_retry) > 1.0


def test_backoff_treats_nonsense_attempts_as_the_first():
    assert backoff_s(0, rand=lambda: 1.0) == backoff_s(1, rand=lambda: 1.0) == 1.0
    assert backoff_s(10_000, rand=lambda: 1.0) == 300.0
