"""`security_event.recorded.v1`: the record a security-relevant happening leaves (a sign-in, a
lockout, a revoked session, a refused access or identity, a settings change, a key rotation),
built the same way by every service and staged through the service's outbox so the audit
service receives it at least once.

    log = SecurityLog(db, service="directory")          # or ServiceWiring.security_log()
    log.record("sign_in_failed", agency_id=a, actor_id=staff_id, actor_kind="staff",
               outcome="refused", reason="bad_password", source=remote_addr)

The record names who, what, how it went and why (a stable code); it never carries PHI, a
password, a token or free text from a request. Every service's relay watches `COLLECTION`
(services.kit.bootstrap adds it), so recording is one insert and never waits for the broker.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Hashable

from clinic.audit.v1 import security_pb2
from services.kit.auth import current_identity
from services.kit.cache import TtlCache
from services.kit.errors import Forbidden
from services.kit.events import Envelope, new_envelope
from services.kit.logs import correlation_id_var
from services.kit.mongo import now_ms
from services.kit.outbox import outbox_fields

log = logging.getLogger(__name__)

EVENT_TYPE = "security_event.recorded.v1"
COLLECTION = "security_outbox"

# The kinds an auditor can ask for; a record of any other kind is refused where it is built.
KINDS = frozenset(
    {
        "sign_in_succeeded",
        "sign_in_failed",
        "sign_in_throttled",
        "account_locked",
        "signed_out",
        "session_revoked",
        "session_idle_expired",
        "access_refused",
        "settings_changed",
        "key_rotated",
        "retention_applied",
        "forged_identity_refused",
        "event_refused",
    }
)
# `operator`: someone running a maintenance command where the service runs (services.kit.keys).
ACTOR_KINDS = frozenset({"staff", "service", "partner", "anonymous", "operator", ""})
OUTCOMES = frozenset({"succeeded", "refused"})
_MAX_FIELD = 200


def _clip(value: str) -> str:
    return (value or "")[:_MAX_FIELD]


def security_event(  # noqa: PLR0913 - one keyword per field of the record
    kind: str,
    *,
    service: str,
    agency_id: str = "",
    actor_id: str = "",
    actor_kind: str = "",
    outcome: str = "refused",
    reason: str = "",
    target_type: str = "",
    target_id: str = "",
    source: str = "",
) -> Envelope:
    """The event for one security happening, in the current request's correlation chain."""
    if kind not in KINDS:
        raise ValueError(f"unknown security event kind {kind!r}")
    if actor_kind not in ACTOR_KINDS:
        raise ValueError(f"unknown actor kind {actor_kind!r}")
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}")
    payload = security_pb2.SecurityEvent(
        agency_id=_clip(agency_id),
        kind=kind,
        actor_id=_clip(actor_id),
        actor_kind=actor_kind,
        outcome=outcome,
        reason=_clip(reason),
        target_type=_clip(target_type),
        target_id=_clip(target_id),
        source=_clip(source),
        service=service,
    )
    payload.occurred_at.GetCurrentTime()
    return new_envelope(
        EVENT_TYPE, payload, agency_id=payload.agency_id, producer=service, correlation_id=correlation_id_var.get()
    )


class SecurityLog:
    """Records security events of one service into its outbox collection `COLLECTION`."""

    def __init__(self, db, *, service: str):
        self.collection = db[COLLECTION]
        self.service = service

    def record(self, kind: str, **fields: str) -> Envelope:
        """Stage one security event (see `security_event` for the fields); returns it."""
        envelope = security_event(kind, service=self.service, **fields)
        self.collection.insert_one(
            {
                "_id": envelope.event_id,
                "kind": kind,
                "agency_id": envelope.agency_id,
                "at": now_ms(),
                **outbox_fields([envelope]),
            }
        )
        log.info("security event recorded", extra={"event_type": EVENT_TYPE, "security_kind": kind})
        return envelope


class OncePerWindow:
    """At most one record per key and window, for refusals anyone can provoke without credentials
    (a forged partner identity, a revoked token replayed): each would otherwise be one insert, one
    published event and one record in the hash-chained trail, so a burst of requests would flood
    the trail. `admit(key)` is 0 for the first occurrence of `key` in its window (record it), else
    how many occurrences the window has kept out, this one included (log it, do not record it).

    In memory, per process. However many keys a flood brings (an attacker with many addresses),
    at most `max_records` are admitted per window of the whole table, and at most `max_keys` keys
    are remembered (a full table forgets the oldest, which can only let one more through within
    the `max_records` bound)."""

    def __init__(
        self,
        window_s: float = 60.0,
        *,
        max_keys: int = 4096,
        max_records: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._windows: TtlCache[Hashable, list[int]] = TtlCache(window_s, max_entries=max_keys, clock=clock)
        self._window_s = window_s
        self._max_records = max_records
        self._clock = clock
        self._period = (clock(), 0, 0)  # (started, admitted, kept out for want of budget)
        self._lock = threading.Lock()

    def admit(self, key: Hashable) -> int:
        with self._lock:
            seen = self._windows.get(key)
            if seen is not None:
                seen[0] += 1
                return seen[0]
            started, admitted, over = self._period
            now = self._clock()
            if now - started >= self._window_s:
                started, admitted, over = now, 0, 0
            if admitted >= self._max_records:
                self._period = (started, admitted, over + 1)
                return over + 1
            self._period = (started, admitted + 1, over)
            self._windows.put(key, [0])
            return 0


def log_suppressed(kind: str, suppressed: int, **extra: str) -> None:
    """Log the occurrences `OncePerWindow` kept out of the trail, at 1, 10, 100, ... in a window: a
    flood leaves a few log lines with its size, not one line per request."""
    if suppressed > 0 and str(suppressed).rstrip("0") == "1":
        log.warning(
            "security event not recorded again this window", extra={"security_kind": kind, "count": suppressed, **extra}
        )


def grpc_refusals_recorded(service_name: str) -> Callable:
    """A decorator for the methods of a gRPC servicer holding `self.security` (a SecurityLog or None):
    each refusal (Forbidden, answered PERMISSION_DENIED) leaves an `access_refused` security event
    naming the caller, the method and the refusal's code before it is answered."""

    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)
        def recorded(self, request, context):
            try:
                return method(self, request, context)
            except Forbidden as exc:
                if self.security is not None:
                    caller = current_identity.get()
                    self.security.record(
                        "access_refused",
                        agency_id=caller.agency_id if caller else "",
                        actor_id=caller.subject if caller else "",
                        actor_kind=caller.kind if caller else "anonymous",
                        reason=exc.code,
                        target_type="grpc_method",
                        target_id=f"{service_name}/{method.__name__}",
                        source=context.peer() if context is not None else "",
                    )
                raise

        return recorded

    return decorate
