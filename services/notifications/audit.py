"""PHI access records: every read of a full result (allowed) and every refused access (denied)
becomes a `phi.accessed.v1` event in its own access-record document (services.kit.audit). A lab
result names its patient by an identifier that is PHI (the MRN: PID-3 / Patient.identifier), so
its read carries the patient's reference (services.kit.patient_ref), never the identifier.

The identifier space (`system`) is the agency's, whichever way the result came, so the same
patient sent over HL7 v2 and as FHIR is one reference: `mrn:<authority>`, the assigning authority
the agency's facility registration names (NOTIFICATIONS_FACILITIES `patient_id=MR@AUTHORITY`, the
only one its HL7 MRNs are taken from), else the registered receiving facility (MSH-6), else the
agency id (an agency registered for FHIR only); with several registrations, the first by facility
name (one that names an authority first). docs/audit-coverage.md, "Patient references"."""

from __future__ import annotations

import functools

from services.kit.audit import access_record, phi_accessed, record_resource_access, refuse_resource_access
from services.kit.auth import Identity
from services.kit.patient_ref import mrn_system, patient_ref
from services.notifications.registrations import Registrations

PRODUCER = "notifications"

# record(store, caller, resource_id, *, resource_type, action="read", outcome="allowed")
record = functools.partial(record_resource_access, producer=PRODUCER)
# refuse(store, caller, resource_id, *, resource_type, code) -> NotFound to raise
refuse = functools.partial(refuse_resource_access, producer=PRODUCER)


def patient_system(registrations: Registrations, agency_id: str) -> str:
    """The identifier space of the agency's lab patient identifiers (see the module doc)."""
    mine = sorted(
        ((name, facility) for name, facility in registrations.facilities.items() if facility.agency_id == agency_id),
        key=lambda pair: (not pair[1].patient_id_authority, pair[0]),
    )
    if not mine:
        return mrn_system(agency_id)
    name, facility = mine[0]
    return mrn_system(facility.patient_id_authority or name, facility.patient_id_type)


def lab_patient_ref(registrations: Registrations, key: str, agency_id: str, identifier: str) -> str:
    """The reference of the patient a lab result names by `identifier` ("" for none)."""
    return patient_ref(agency_id, patient_system(registrations, agency_id), identifier, key=key)


def record_patient_read(
    store, caller: Identity, resource_id: str, *, resource_type: str, reference: str, reference_system: str = ""
) -> None:
    """One allowed read of a resource about one patient (its reference, made in `reference_system`),
    as its own access-record document."""
    event = phi_accessed(
        caller,
        service=PRODUCER,
        resource_type=resource_type,
        resource_id=resource_id,
        patient_id=reference,
        patient_ref_system=reference_system if reference else "",
    )
    store.record_access(access_record(caller, [event], resource_id=resource_id, action="read", outcome="allowed"))
