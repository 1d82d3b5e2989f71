"""The time deadlines are judged by: escalations, due reminders, acknowledge-by dates, coverage
windows, retention. Tests move it forward instead of sleeping for real minutes.

    from services.kit import clock
    overdue = clock.now_ms() - item["created_at"] > minutes * 60_000

`now_ms()` is the wall clock plus an offset that only a test clock changes. Stored timestamps
(created_at, read_at, ...) keep using the plain wall clock, so moving the test clock forward makes
everything already stored look older, exactly as real time passing would. Token expiry, leases,
retries and other timers do not read this clock.

The test clock is off unless a process was started with `CLINIC_TEST_CLOCK=1` outside
production (production refuses the setting, as it refuses fault injection). A service that has
deadline work registers a `control_blueprint()` on its own port (never routed by the gateway):

    POST /internal/v1/test-clock {"advance_ms": 1860000}

moves its clock forward and runs every deadline pass registered with `on_advance()` at once, so a
test reads the outcome in the answer's wake without polling. With the setting off the route
answers 404, like any unknown route.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from services.kit.settings import Env

log = logging.getLogger(__name__)

SETTING = "CLINIC_TEST_CLOCK"
MAX_ADVANCE_MS = 366 * 24 * 3600 * 1000  # one step moves at most a year (retention tests need years: several steps)

_lock = threading.Lock()
_offset_ms = 0
_enabled = False
_passes: list[tuple[str, Callable[[int], object]]] = []


def now_ms() -> int:
    """Milliseconds since the epoch, by the clock deadlines are judged by."""
    return int(time.time() * 1000) + _offset_ms


def offset_ms() -> int:
    return _offset_ms


def test_clock_setting(env: Env) -> bool:
    """Whether CLINIC_TEST_CLOCK is on; a problem in production."""
    enabled = env.bool(SETTING, False)
    if enabled and env.production:
        env.problems.append(f"{SETTING} is for tests only: production refuses it (unset it)")
        return False
    return enabled


def enable(on: bool = True) -> None:
    """Allow the test clock to move (set at start-up from the setting, and by unit tests)."""
    global _enabled  # noqa: PLW0603 - one process-wide switch
    _enabled = on
    if on:
        log.warning("test clock enabled: deadlines follow a clock tests may move forward")


def enabled() -> bool:
    return _enabled


def on_advance(name: str, run_pass: Callable[[int], object]) -> None:
    """Register a deadline pass, `run_pass(now_ms)`, run after each advance of the test clock (and
    by nothing else: the feature's own background loop runs it in production)."""
    with _lock:
        _passes[:] = [(n, p) for n, p in _passes if n != name]
        _passes.append((name, run_pass))


def advance(ms: int) -> dict:
    """Move the clock `ms` forward and run every registered deadline pass; what each pass returned."""
    global _offset_ms  # noqa: PLW0603
    if not _enabled:
        raise RuntimeError("the test clock is not enabled")
    with _lock:
        _offset_ms += ms
        passes = list(_passes)
    now = now_ms()
    return {"now_ms": now, "offset_ms": _offset_ms, "passes": {name: run_pass(now) for name, run_pass in passes}}


def reset() -> None:
    """Back to the wall clock, passes forgotten (unit tests)."""
    global _offset_ms  # noqa: PLW0603
    with _lock:
        _offset_ms = 0
        _passes.clear()


def control_blueprint():
    """`POST /internal/v1/test-clock` on the service's own port; 404 unless the test clock is on."""
    from flask import Blueprint

    from services.kit.errors import NotFound
    from services.kit.validation import Int, json_body, validate

    blueprint = Blueprint("test_clock", __name__, url_prefix="/internal/v1")

    @blueprint.post("/test-clock")
    def move():
        if not _enabled:
            raise NotFound("not_found", "no such route")
        body = validate(json_body(), {"advance_ms": Int(minimum=0, maximum=MAX_ADVANCE_MS, required=True)})
        answer = advance(body["advance_ms"])
        return {**answer, "passes": {name: _plain(result) for name, result in answer["passes"].items()}}

    return blueprint


def _plain(result: object) -> object:
    """A pass's result as JSON can carry it (a count, a dict of counts, or its repr)."""
    if result is None or isinstance(result, int | float | str | bool | list | dict):
        return result
    return repr(result)
