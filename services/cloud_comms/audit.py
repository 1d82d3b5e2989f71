"""PHI access records: every view of a message or attachment (allowed) and every refused access
(denied) becomes a `phi.accessed.v1` event (kit audit), staged in its own access-record document."""

from __future__ import annotations

import logging

from services.cloud_comms.store import CloudCommsStore
from services.kit.audit import access_record, phi_accessed
from services.kit.auth import Identity
from services.kit.errors import NotFound

log = logging.getLogger(__name__)

PRODUCER = "cloud-comms"


def record(
    store: CloudCommsStore,
    caller: Identity,
    resource_id: str,
    *,
    resource_type: str,
    action: str = "read",
    outcome: str = "allowed",
) -> None:
    event = phi_accessed(
        caller, service=PRODUCER, resource_type=resource_type, resource_id=resource_id, action=action, outcome=outcome
    )
    store.record_access(access_record(caller, [event], resource_id=resource_id, action=action, outcome=outcome))


def refuse(store: CloudCommsStore, caller: Identity, resource_id: str, *, resource_type: str, code: str) -> NotFound:
    """Record the refused access (who tried what, never whether it exists) and return the 404."""
    record(store, caller, resource_id, resource_type=resource_type, outcome="denied")
    log.info("access refused", extra={"staff_id": caller.subject, "agency_id": caller.agency_id})
    return NotFound(code, "no such resource")
