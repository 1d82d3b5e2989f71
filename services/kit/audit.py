"""`phi.accessed.v1`: the record every read of PHI leaves, built the same way by every service and
staged through the service's outbox (services.kit.outbox) so it is published at least once.

    events = [phi_accessed(caller, service="auto-reply", resource_type="auto_reply", resource_id=rid)]
    store.record_access(access_record(caller, events, action="read"))
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from clinic.audit.v1 import audit_pb2
from services.kit.auth import Identity
from services.kit.errors import NotFound
from services.kit.events import Envelope, new_envelope
from services.kit.logs import correlation_id_var
from services.kit.mongo import now_ms
from services.kit.outbox import outbox_fields

log = logging.getLogger(__name__)

EVENT_TYPE = "phi.accessed.v1"


def phi_accessed(
    caller: Identity,
    *,
    service: str,
    resource_type: str,
    resource_id: str,
    action: str = "read",
    outcome: str = "allowed",
    patient_id: str = "",
    patient_ref_system: str = "",
) -> Envelope:
    """The event for `caller` reading (or being refused) one resource, in the caller's agency and the
    current request's correlation chain. `patient_ref_system`: the identifier space of a keyed
    patient reference in `patient_id` (services.kit.patient_ref), so the trail can be searched by it."""
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
        service=service,
        patient_id=patient_id,
        patient_ref_system=patient_ref_system,
    )
    return new_envelope(
        EVENT_TYPE, payload, agency_id=caller.agency_id, producer=service, correlation_id=correlation_id_var.get()
    )


def access_record(caller: Identity, events: Sequence[Envelope], **fields) -> dict:
    """A standalone outbox document carrying `events`, for reads that change no state (one write
    however many resources were shown). `fields` are extra, non-PHI columns (action, resource_id)."""
    if not events:
        raise ValueError("an access record carries at least one event")
    return {
        "_id": events[0].event_id,
        "agency_id": caller.agency_id,
        "actor_id": caller.subject,
        "at": now_ms(),
        **fields,
        **outbox_fields(events),
    }


def record_resource_access(  # noqa: PLR0913 - who, what, and how it went
    store,
    caller: Identity,
    resource_id: str,
    *,
    producer: str,
    resource_type: str,
    action: str = "read",
    outcome: str = "allowed",
) -> None:
    """One access to one resource as its own access-record document (`store.record_access(doc)`)."""
    event = phi_accessed(
        caller, service=producer, resource_type=resource_type, resource_id=resource_id, action=action, outcome=outcome
    )
    store.record_access(access_record(caller, [event], resource_id=resource_id, action=action, outcome=outcome))


def refuse_resource_access(
    store, caller: Identity, resource_id: str, *, producer: str, resource_type: str, code: str
) -> NotFound:
    """Record a refused access (who tried what, never whether it exists) and return the 404 to raise."""
    record_resource_access(
        store, caller, resource_id, producer=producer, resource_type=resource_type, outcome="denied"
    )
    log.info("access refused", extra={"staff_id": caller.subject, "agency_id": caller.agency_id})
    return NotFound(code, "no such resource")
