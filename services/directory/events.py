"""Events the directory announces (staged through the transactional outbox of the changed document)."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from clinic.directory.v1 import directory_pb2
from services.kit.auth import ACCESS_TOKEN_TTL_S
from services.kit.events import Envelope, new_envelope
from services.kit.logs import correlation_id_var
from services.kit.revocations import SESSION_REVOKED_EVENT

PRODUCER = "directory"


def access_expires_at(revoked_at_ms: int) -> int:
    """When the last access token a revoked session may hold has expired.

    Tokens are issued no later than the revocation and live at most ACCESS_TOKEN_TTL_S (the
    configurable lifetime's upper bound), so none outlives this instant whatever the setting.
    """
    return revoked_at_ms + ACCESS_TOKEN_TTL_S * 1000


def _timestamp(ms: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def session_revoked_message(session: dict, reason: str, revoked_at_ms: int) -> directory_pb2.SessionRevoked:
    return directory_pb2.SessionRevoked(
        session_id=session["_id"],
        staff_id=session.get("staff_id", ""),
        agency_id=session.get("agency_id", ""),
        reason=reason,
        revoked_at=_timestamp(revoked_at_ms),
        access_expires_at=_timestamp(access_expires_at(revoked_at_ms)),
    )


def session_revoked(session: dict, reason: str, revoked_at_ms: int) -> Envelope:
    """`session.revoked.v1` for a session document; its event id is derived from the session id
    (a session is revoked once), so a repeated staging is one event for consumers."""
    return new_envelope(
        SESSION_REVOKED_EVENT,
        session_revoked_message(session, reason, revoked_at_ms),
        agency_id=session.get("agency_id", ""),
        producer=PRODUCER,
        correlation_id=correlation_id_var.get(),
        event_id=f"{session['_id']}-revoked",
    )
