"""Fault injection for fault tests: a process kills itself (SIGKILL, as `kill -9` would) at a named
point, so a crash lands exactly where a test needs it (between two writes that are not atomic).

    CLINIC_FAULT_CRASH_AT=inbox.fanout.after_items,inbox.send.before_answer

A service's config reads the setting with `crash_points(env)`, which production refuses (a
settings error at start-up, like any other invalid setting), and its `build()` arms them with
`arm(points)`; the code under test marks its points with `crash_point("inbox.fanout.after_items")`,
which costs one set lookup when nothing is armed. Nothing is armed unless a process was started
with the setting outside production.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable

from services.kit.settings import Env

log = logging.getLogger(__name__)

SETTING = "CLINIC_FAULT_CRASH_AT"

_armed: frozenset[str] = frozenset()


def crash_points(env: Env) -> frozenset[str]:
    """The points CLINIC_FAULT_CRASH_AT names (comma separated); a problem in production."""
    raw = env.str(SETTING, "")
    points = frozenset(name.strip() for name in raw.split(",") if name.strip())
    if points and env.production:
        env.problems.append(f"{SETTING} is for fault tests only: production refuses it (unset it)")
        return frozenset()
    return points


def arm(points: Iterable[str]) -> None:
    """Crash at these points from now on (replacing any armed before); empty disarms."""
    global _armed  # noqa: PLW0603 - one process-wide switch, set at start-up (and by tests)
    _armed = frozenset(points)
    if _armed:
        log.warning("fault injection armed: this process kills itself at %s", ", ".join(sorted(_armed)))


def armed() -> frozenset[str]:
    return _armed


def crash_point(name: str) -> None:
    """Kill this process at once (SIGKILL: no drain, no finally, no goodbye) when `name` is armed."""
    if name in _armed:
        log.warning("fault injection: crashing at %s", name)
        os.kill(os.getpid(), signal.SIGKILL)
