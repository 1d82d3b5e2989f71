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
    agency_id: str | None = None,
    actor_id: str | None = None,
    actor_kind: str | None = None,
) -> Envelope:
    accessed_at = Timestamp()
    accessed_at.GetCurrentTime()
    agency = agency_id or caller.agency_id
    payload = audit_pb2.PhiAccessed(
        agency_id=agency,
        actor_id=actor_id or caller.subject,
        actor_kind=actor_kind or caller.kind,
        resource_type=resource_type,
        resource_id=resource_id,
        action=action,
        outcome=outcome,
        accessed_at=accessed_at,
        service=PRODUCER,
    )
    return new_envelope(
        "phi.accessed.v1", payload, agency_id=agency, producer=PRODUCER, correlation_id=correlation_id_var.get()
    )


def record_access(
    store: InboxStore, event: Envelope | list[Envelope], resource_id: str, action: str, caller: Identity
) -> None:
    """A standalone access record (one document carrying its events) for reads that change no state;
    a list records several resources read at once (a thread) in one write."""
    events = event if isinstance(event, list) else [event]
    store.record_denial(
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
