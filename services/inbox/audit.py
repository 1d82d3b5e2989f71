"""PHI access records: every read of a body (allowed) and every refused access (denied) becomes a
`phi.accessed.v1` event, staged in the same write as the state it goes with (outbox)."""

from __future__ import annotations

import logging

from google.protobuf.timestamp_pb2 import Timestamp

from clinic.audit.v1 import audit_pb2
from services.inbox.store import InboxStore
from services.kit.auth import Identity
from services.kit.errors import NotFound
from services.kit.events import Envelope, new_envelope
from services.kit.logs import correlation_id_var
from services.kit.mongo import now_ms
from services.kit.outbox import outbox_fields

log = logging.getLogger(__name__)

PRODUCER = "inbox"


def accessed_event(
    caller: Identity,
    resource_id: str,
    *,
    resource_type: str = "message",
    action: str = "read",
    outcome: str = "allowed",
) -> Envelope:
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
    return new_envelope(
        "phi.accessed.v1",
        payload,
        agency_id=caller.agency_id,
        producer=PRODUCER,
        correlation_id=correlation_id_var.get(),
    )


def record_access(
    store: InboxStore, event: Envelope | list[Envelope], resource_id: str, action: str, caller: Identity
) -> None:
    """A standalone access record (one document carrying its events) for reads that change no state;
    a list records several resources read at once (a thread) in one write."""
    events = event if isinstance(event, list) else [event]
    store.record_access(
        {
            "_id": events[0].event_id,
            "agency_id": caller.agency_id,
            "actor_id": caller.subject,
            "resource_id": resource_id,
            "action": action,
            "at": now_ms(),
            **outbox_fields(events),
        }
    )


def record_read(
    store: InboxStore, caller: Identity, resource_id: str, resource_type: str = "message", action: str = "read"
) -> None:
    """Record that `caller` was shown the content of one resource (a read that changes no state)."""
    event = accessed_event(caller, resource_id, resource_type=resource_type, action=action)
    record_access(store, event, resource_id, action, caller)


def refuse(
    store: InboxStore,
    caller: Identity,
    resource_id: str,
    action: str,
    *,
    resource_type: str = "message",
    code: str = "message_not_found",
    message: str = "no such message",
) -> NotFound:
    """Record the refused access (who tried what, never whether it exists) and return the 404."""
    event = accessed_event(caller, resource_id, resource_type=resource_type, action=action, outcome="denied")
    record_access(store, event, resource_id, action, caller)
    log.info("access refused", extra={"staff_id": caller.subject, "agency_id": caller.agency_id})
    return NotFound(code, message)
