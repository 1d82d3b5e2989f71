"""Resilience towards an ePrescribing vendor: a circuit breaker per vendor API root, Retry-After
parsing, and the jittered exponential backoff the sync engine waits between attempts.

    breakers = CircuitBreakers(failure_threshold=5, cooldown_s=30.0)
    with breakers.for_key(practice.base_url).guard():
        ...one vendor operation (it may make several HTTP requests)...

`CircuitBreaker`, one per vendor API root (every practice on that root shares it):

- CLOSED: calls go through. Each `VendorUnavailable` (timeouts, connection errors, 5xx, 429,
  unreadable answers) adds one to a run of consecutive failures; any other outcome (a success, or
  `VendorRejected`, which proves the vendor is up and answering) ends the run. After
  `failure_threshold` consecutive failures the circuit OPENS.
- OPEN: every call fails fast with `CircuitOpen` (a `VendorUnavailable` whose `retry_after_s` is
  what is left of the cool-down) without reaching the vendor, for `cooldown_s`.
- HALF_OPEN: once the cool-down is over, exactly one trial call goes through (the others still
  fail fast). Its success closes the circuit; its failure opens it again for a new cool-down.

Thread-safe. The clock is injectable (`clock=`, seconds, monotonic) so tests need not sleep.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import enum
import math
import random
import threading
import time
from collections.abc import Callable, Iterator

from services.erx_bridge.vendors.base import VendorRejected, VendorUnavailable

__all__ = [
    "CircuitBreaker",
    "CircuitBreakers",
    "CircuitOpen",
    "CircuitState",
    "backoff_s",
    "parse_retry_after",
]

DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_COOLDOWN_S = 30.0


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitOpen(VendorUnavailable):
    """The circuit is open: the vendor was not asked. `retry_after_s` is the rest of the cool-down."""


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
        name: str = "vendor",
    ):
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if cooldown_s < 0:
            raise ValueError("cooldown_s must not be negative")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.name = name  # safe to show: a label, never a URL with credentials
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False

    @property
    def state(self) -> CircuitState:
        """The state as a caller arriving now would find it (OPEN turns HALF_OPEN once cooled down)."""
        with self._lock:
            if self._state is CircuitState.OPEN and self._cooled_down():
                return CircuitState.HALF_OPEN
            return self._state

    @property
    def consecutive_failures(self) -> int:
        with self._lock:
            return self._failures

    def before_call(self) -> None:
        """Let a call through, or raise `CircuitOpen`. A call let through must be followed by
        exactly one `record_success()` or `record_failure()` (`guard()` does both)."""
        with self._lock:
            if self._state is CircuitState.CLOSED:
                return
            if self._state is CircuitState.OPEN:
                if not self._cooled_down():
                    raise CircuitOpen(f"{self.name}: circuit open", retry_after_s=self._remaining())
                self._state = CircuitState.HALF_OPEN
                self._trial_in_flight = False
            # HALF_OPEN: one trial at a time.
            if self._trial_in_flight:
                raise CircuitOpen(f"{self.name}: circuit half-open, trial call under way", retry_after_s=None)
            self._trial_in_flight = True

    def record_success(self) -> None:
        with self._lock:
            self._state = CircuitState.CLOSED
            self._failures = 0
            self._trial_in_flight = False

    def record_failure(self) -> None:
        with self._lock:
            self._trial_in_flight = False
            if self._state is CircuitState.HALF_OPEN:
                self._open()
                return
            self._failures += 1
            if self._state is CircuitState.CLOSED and self._failures >= self.failure_threshold:
                self._open()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Run one vendor operation through the breaker: `VendorUnavailable` (and anything
        unexpected) counts as a failure; a normal exit or `VendorRejected` as a success."""
        self.before_call()
        try:
            yield
        except VendorRejected:
            self.record_success()  # the vendor is up: it answered, and refused
            raise
        except Exception:
            self.record_failure()
            raise
        except BaseException:
            self._release()  # interrupted (KeyboardInterrupt, SystemExit): no verdict on the vendor
            raise
        self.record_success()

    def reset(self) -> None:
        self.record_success()

    def _release(self) -> None:
        with self._lock:
            self._trial_in_flight = False

    # -- internals (lock held) ---------------------------------------------------------------

    def _open(self) -> None:
        self._state = CircuitState.OPEN
        self._opened_at = self._clock()
        self._failures = max(self._failures, self.failure_threshold)

    def _cooled_down(self) -> bool:
        return self._clock() - self._opened_at >= self.cooldown_s

    def _remaining(self) -> float:
        return max(0.0, self.cooldown_s - (self._clock() - self._opened_at))


class CircuitBreakers:
    """One `CircuitBreaker` per key (a vendor's API root), made on first use with these settings."""

    def __init__(
        self,
        *,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()

    def for_key(self, key: str, name: str = "vendor") -> CircuitBreaker:
        key = key.rstrip("/").lower()
        with self._lock:
            breaker = self._breakers.get(key)
            if breaker is None:
                breaker = CircuitBreaker(
                    failure_threshold=self.failure_threshold, cooldown_s=self.cooldown_s, clock=self._clock, name=name
                )
                self._breakers[key] = breaker
            return breaker


def parse_retry_after(value: str | None, *, now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (RFC 9110: delay-seconds or an HTTP-date), or None
    when absent or unreadable. A date in the past gives 0."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    now = now or dt.datetime.now(dt.UTC)
    return max(0.0, (when - now).total_seconds())


_system_random = random.SystemRandom()


def backoff_s(
    attempt: int,
    retry_after_s: float | None = None,
    *,
    base_s: float = 1.0,
    cap_s: float = 300.0,
    rand: Callable[[], float] = _system_random.random,
) -> float:
    """How long to wait before attempt number `attempt + 1`, after `attempt` (1, 2, ...) failures.

    Without a Retry-After: exponential with "equal jitter", in [e/2, e] where
    e = min(cap_s, base_s * 2 ** (attempt - 1)): never zero, never past the cap, and spread so
    that 200 prescribers failing together do not come back together.

    With a Retry-After (`retry_after_s`, from `VendorUnavailable.retry_after_s`): never earlier
    than the vendor asked, even past the cap, plus a jitter in [0, max(base_s, 20% of it)) so
    the callers it told to wait do not all return in the same second.
    """
    attempt = max(1, int(attempt))
    r = min(max(rand(), 0.0), 1.0)
    if retry_after_s is not None and math.isfinite(retry_after_s):
        wait = max(0.0, float(retry_after_s))
        return wait + r * max(base_s, 0.2 * wait)
    exponent = min(attempt - 1, 62)  # 2**62 * base is past any cap; avoids huge floats
    ceiling = min(cap_s, base_s * 2.0**exponent)
    return ceiling / 2.0 + r * ceiling / 2.0
