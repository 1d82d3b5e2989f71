"""PHI access records: every read of a full result (allowed) and every refused access (denied)
becomes a `phi.accessed.v1` event in its own access-record document (services.kit.audit). A lab
result names its patient (the sending system's identifier, PID-3 / Patient.identifier), so its
read carries it as `patient_id`."""

from __future__ import annotations

import functools

from services.kit.audit import access_record, phi_accessed, record_resource_access, refuse_resource_access
from services.kit.auth import Identity

PRODUCER = "notifications"
PATIENT_ID_MAX = 128  # an identifier, never free text: longer ones are cut

# record(store, caller, resource_id, *, resource_type, action="read", outcome="allowed")
record = functools.partial(record_resource_access, producer=PRODUCER)
# refuse(store, caller, resource_id, *, resource_type, code) -> NotFound to raise
refuse = functools.partial(refuse_resource_access, producer=PRODUCER)


def record_patient_read(store, caller: Identity, resource_id: str, *, resource_type: str, patient_id: str) -> None:
    """One allowed read of a resource about one patient, as its own access-record document."""
    event = phi_accessed(
        caller,
        service=PRODUCER,
        resource_type=resource_type,
        resource_id=resource_id,
        patient_id=patient_id[:PATIENT_ID_MAX],
    )
    store.record_access(access_record(caller, [event], resource_id=resource_id, action="read", outcome="allowed"))
