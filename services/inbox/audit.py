"""PHI access records: every read of a body (allowed), every listing that shows PHI (subjects,
titles, label names) and every refused access (denied) becomes a `phi.accessed.v1` event, staged
in the same write as the state it goes with, or in one access-record document of its own (outbox).

A listing is one event however many items it shows: resource type `<what>_list` (or
`label_items`), resource id the folder, label, staff member or patient it lists, action "list".
The ids shown are not in the event (see docs/audit-coverage.md for why); `patient_id` is filled
whenever the listing or the read is about one patient.
"""

from __future__ import annotations

import logging

from services.inbox.store import InboxStore
from services.kit.audit import access_record, phi_accessed
from services.kit.auth import Identity
from services.kit.errors import NotFound
from services.kit.events import Envelope

log = logging.getLogger(__name__)

PRODUCER = "inbox"
LIST_ACTION = "list"


def accessed_event(
    caller: Identity,
    resource_id: str,
    *,
    resource_type: str = "message",
    action: str = "read",
    outcome: str = "allowed",
    patient_id: str = "",
) -> Envelope:
    return phi_accessed(
        caller,
        service=PRODUCER,
        resource_type=resource_type,
        resource_id=resource_id,
        action=action,
        outcome=outcome,
        patient_id=patient_id or "",
    )


def record_access(
    store: InboxStore, event: Envelope | list[Envelope], resource_id: str, action: str, caller: Identity, **fields
) -> None:
    """A standalone access record (one document carrying its events) for reads that change no state;
    a list records several resources read at once (a thread) in one write. `fields` are extra,
    non-PHI columns of the record (how many items a listing showed)."""
    events = event if isinstance(event, list) else [event]
    store.record_access(access_record(caller, events, resource_id=resource_id, action=action, **fields))


def record_read(
    store: InboxStore,
    caller: Identity,
    resource_id: str,
    resource_type: str = "message",
    action: str = "read",
    *,
    patient_id: str = "",
) -> None:
    """Record that `caller` was shown the content of one resource (a read that changes no state)."""
    event = accessed_event(caller, resource_id, resource_type=resource_type, action=action, patient_id=patient_id)
    record_access(store, event, resource_id, action, caller)


def record_list(
    store: InboxStore, caller: Identity, resource_type: str, resource_id: str, shown: int, *, patient_id: str = ""
) -> None:
    """Record that `caller` was shown a listing (one insert, no read): `resource_id` names what was
    listed (a folder, a label, a patient), `shown` how many entries the answer carried."""
    event = accessed_event(caller, resource_id, resource_type=resource_type, action=LIST_ACTION, patient_id=patient_id)
    record_access(store, event, resource_id, LIST_ACTION, caller, resource_type=resource_type, shown=shown)


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
