"""Who may put what into the audit trail.

The bus authenticates the producer of every message (services.kit.bus.signing: the consumer
checks the producer's signature before a handler runs), but the payload names its own `service`,
and any service may publish `phi.accessed.v1` and `security_event.recorded.v1`. Without a check
here, any one service could write records that look like another's: a sign-in that never
happened, or a refused forgery attributed to the directory. So the audit service records an event
only when

- the payload's `service` is the envelope's authenticated `producer` (else parked with
  `REASON_SERVICE_NOT_PRODUCER`), and
- for a security event, its kind is one that producer may report, by `SECURITY_KINDS` below (else
  parked with `REASON_KIND_NOT_ALLOWED`, or `REASON_KIND_UNKNOWN` for a kind not in the table).

`SECURITY_KINDS` is the one table of which producer reports which kind, kept beside the kinds of
services.kit.security_events.KINDS (a test checks that both list the same kinds). Sign-ins and
sessions are the directory's (and the web front end's, which signs people in through it); a
refused partner identity is reported by the services that take partner requests (and the audit
service); refusals of access or of a bus message, settings changes and key rotations happen in
every service.
"""

from __future__ import annotations

from collections.abc import Mapping

from services.kit.bus.signing import KNOWN_PRODUCERS

ANY_PRODUCER = frozenset(KNOWN_PRODUCERS)
SIGN_IN_PRODUCERS = frozenset({"directory", "web"})
PARTNER_FACING = frozenset({"directory", "inbox", "notifications", "audit"})

# kind -> the producers that may report it.
SECURITY_KINDS: Mapping[str, frozenset[str]] = {
    "sign_in_succeeded": SIGN_IN_PRODUCERS,
    "sign_in_failed": SIGN_IN_PRODUCERS,
    "sign_in_throttled": SIGN_IN_PRODUCERS,
    "account_locked": SIGN_IN_PRODUCERS,
    "signed_out": SIGN_IN_PRODUCERS,
    "session_revoked": SIGN_IN_PRODUCERS,
    "session_idle_expired": SIGN_IN_PRODUCERS,
    "forged_identity_refused": PARTNER_FACING,
    "event_refused": ANY_PRODUCER,
    "access_refused": ANY_PRODUCER,
    "settings_changed": ANY_PRODUCER,
    "key_rotated": ANY_PRODUCER,
    "retention_applied": frozenset({"inbox"}),
}

REASON_SERVICE_NOT_PRODUCER = "service_not_producer"
REASON_KIND_NOT_ALLOWED = "security_kind_not_allowed"
REASON_KIND_UNKNOWN = "security_kind_unknown"


def service_refusal(producer: str, service: str) -> str | None:
    """Why an event whose payload names `service` cannot be recorded from `producer`, or None."""
    return None if service == producer else REASON_SERVICE_NOT_PRODUCER


def security_kind_refusal(producer: str, kind: str) -> str | None:
    """Why `producer` may not report a security event of `kind`, or None when it may."""
    allowed = SECURITY_KINDS.get(kind)
    if allowed is None:
        return REASON_KIND_UNKNOWN
    return None if producer in allowed else REASON_KIND_NOT_ALLOWED
