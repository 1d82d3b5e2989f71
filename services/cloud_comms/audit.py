"""PHI access records: every view of a message, attachment or fax (allowed) and every refused access (denied)
becomes a `phi.accessed.v1` event in its own access-record document (services.kit.audit). Where a
view shows roster patients (triage), their ids are the events' `patient_id`."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from services.kit.audit import access_record, phi_accessed, record_resource_access, refuse_resource_access
from services.kit.auth import Identity

PRODUCER = "cloud-comms"

# record(store, caller, resource_id, *, resource_type, action="read", outcome="allowed")
record = functools.partial(record_resource_access, producer=PRODUCER)
# refuse(store, caller, resource_id, *, resource_type, code) -> NotFound to raise
refuse = functools.partial(refuse_resource_access, producer=PRODUCER)


def record_with_patients(
    store, caller: Identity, resource_id: str, *, resource_type: str, patient_id: str, shown: Sequence[str]
) -> None:
    """One read of a resource about `patient_id` ("" when none) that also showed the roster
    patients `shown`: an event for the resource, then one per other patient shown, in one insert."""
    events = [
        phi_accessed(
            caller, service=PRODUCER, resource_type=resource_type, resource_id=resource_id, patient_id=patient_id
        )
    ]
    events += [
        phi_accessed(caller, service=PRODUCER, resource_type="patient", resource_id=pid, patient_id=pid)
        for pid in dict.fromkeys(shown)
        if pid and pid != patient_id
    ]
    store.record_access(access_record(caller, events, resource_id=resource_id, action="read", outcome="allowed"))
