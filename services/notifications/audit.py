"""PHI access records: every read of a full result (allowed) and every refused access (denied)
becomes a `phi.accessed.v1` event, staged in its own access-record document (outbox)."""

from __future__ import annotations

import logging

from google.protobuf.timestamp_pb2 import Timestamp

from clinic.audit.v1 import audit_pb2
from services.kit.auth import Identity
from services.kit.errors import NotFound
from services.kit.events import new_envelope
from services.kit.logs import correlation_id_var
from services.kit.mongo import now_ms
from services.kit.outbox import outbox_fields
from services.notifications.store import NotificationsStore

log = logging.getLogger(__name__)

PRODUCER = "notifications"
EVENT = "phi.accessed.v1"


def record(
    store: NotificationsStore,
    caller: Identity,
    resource_id: str,
    *,
    resource_type: str,
    action: str = "read",
    outcome: str = "allowed",
) -> None:
    accessed_at = Timestamp()
    accessed_at.GetCurrentTime()
    payload = audit_pb2.PhiAccessed(
        agency_id=caller.agency_id,
        actor_id=caller.subject,
        actor_kind=caller.kind,
        resource_type=resource_type,
        resource_id=resource_id,
        action=action,
        outcome=outcome,
        accessed_at=accessed_at,
        service=PRODUCER,
    )
    event = new_envelope(
        EVENT, payload, agency_id=caller.agency_id, producer=PRODUCER, correlation_id=correlation_id_var.get()
    )
    store.record_access(
        {
            "_id": event.event_id,
            "agency_id": caller.agency_id,
            "actor_id": caller.subject,
            "resource_id": resource_id,
            "action": action,
            "outcome": outcome,
            "at": now_ms(),
            **outbox_fields([event]),
        }
    )


def refuse(store: NotificationsStore, caller: Identity, resource_id: str, *, resource_type: str, code: str) -> NotFound:
    """Record the refused access (who tried what, never whether it exists) and return the 404."""
    record(store, caller, resource_id, resource_type=resource_type, outcome="denied")
    log.info("access refused", extra={"staff_id": caller.subject, "agency_id": caller.agency_id})
    return NotFound(code, "no such resource")
