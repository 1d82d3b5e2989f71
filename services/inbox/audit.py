"""PHI access records: every read of a body (allowed) and every refused access (denied) becomes a
`phi.accessed.v1` event, staged in the same write as the state it goes with (outbox)."""

from __future__ import annotations

import logging

from services.inbox.store import InboxStore
from services.kit.audit import access_record, phi_accessed
from services.kit.auth import Identity
from services.kit.errors import NotFound
from services.kit.events import Envelope

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
    return phi_accessed(
        caller, service=PRODUCER, resource_type=resource_type, resource_id=resource_id, action=action, outcome=outcome
    )


def record_access(
    store: InboxStore, event: Envelope | list[Envelope], resource_id: str, action: str, caller: Identity
) -> None:
    """A standalone access record (one document carrying its events) for reads that change no state;
    a list records several resources read at once (a thread) in one write."""
    events = event if isinstance(event, list) else [event]
    store.record_access(access_record(caller, events, resource_id=resource_id, action=action))


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
