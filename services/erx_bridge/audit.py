"""PHI access records: every read of eRx item content (the Pending Rx report, single sign-on into
a patient's chart) leaves `phi.accessed.v1` events, staged in access-record documents (outbox).

One event per item shown (resource type `erx_item`, the item id), with the patient of the item as
`patient_id` when the item names one, so an auditor can tell which patients' prescriptions a staff
member saw; a report's events ride in documents of at most `EVENTS_PER_RECORD`, one insert each.

The vendor's patient id is an identifier of the patient (PHI), so the trail holds its reference
instead (services.kit.patient_ref, system `erx:<vendor>`, the agency's practice vendor): never the
vendor's id itself; `record` drops anything that is not a reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from services.erx_bridge.delivery import PRODUCER
from services.erx_bridge.store import ErxStore
from services.kit.audit import access_record, phi_accessed
from services.kit.auth import Identity
from services.kit.patient_ref import erx_system, is_patient_ref
from services.kit.patient_ref import patient_ref as reference_of

RESOURCE_TYPE = "erx_item"
EVENTS_PER_RECORD = 200


def record(
    store: ErxStore,
    caller: Identity,
    item_ids: Sequence[str],
    *,
    action: str = "read",
    outcome: str = "allowed",
    resource_type: str = RESOURCE_TYPE,
    patients: Mapping[str, str] | None = None,
    vendor: str = "",
) -> None:
    """`patients` maps an item id to the reference of its patient (`patient_refs`), made for the
    practice's `vendor` (its identifier space goes with each reference)."""
    system = erx_system(vendor) if vendor else ""
    patients = patients or {}
    for start in range(0, len(item_ids), EVENTS_PER_RECORD):
        chunk = item_ids[start : start + EVENTS_PER_RECORD]
        events = [
            phi_accessed(
                caller,
                service=PRODUCER,
                resource_type=resource_type,
                resource_id=iid,
                action=action,
                outcome=outcome,
                patient_id=_reference(patients.get(iid, "")),
                patient_ref_system=system if _reference(patients.get(iid, "")) else "",
            )
            for iid in chunk
        ]
        store.record_access(
            access_record(caller, events, action=action, outcome=outcome, resource_type=resource_type, count=len(chunk))
        )


def _reference(value: str) -> str:
    return value if is_patient_ref(value) else ""


def patient_ref(key: str, agency_id: str, vendor: str, vendor_patient_id) -> str:
    """The reference of the patient the vendor names `vendor_patient_id` ("" when it names none)."""
    return reference_of(agency_id, erx_system(vendor), str(vendor_patient_id or ""), key=key)


def patient_refs(key: str, agency_id: str, vendor: str, patients: Mapping[str, str]) -> dict[str, str]:
    """Item id -> the reference of its patient, from item id -> the vendor's patient id."""
    return {iid: patient_ref(key, agency_id, vendor, pid) for iid, pid in patients.items()}
