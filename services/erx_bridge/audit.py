"""PHI access records: every read of eRx item content (the Pending Rx report, single sign-on into
a patient's chart) leaves `phi.accessed.v1` events, staged in access-record documents (outbox).

One event per item shown (resource type `erx_item`, the item id), with the vendor's patient id of
the item as `patient_id` when the item names one, so an auditor can tell which patients'
prescriptions a staff member saw; a report's events ride in documents of at most
`EVENTS_PER_RECORD`, one insert each.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from services.erx_bridge.delivery import PRODUCER
from services.erx_bridge.store import ErxStore
from services.kit.audit import access_record, phi_accessed
from services.kit.auth import Identity

RESOURCE_TYPE = "erx_item"
PATIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
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
) -> None:
    """`patients` maps an item id to the vendor's patient id of that item (already opened)."""
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
                patient_id=patient_ref(patients.get(iid, "")),
            )
            for iid in chunk
        ]
        store.record_access(
            access_record(caller, events, action=action, outcome=outcome, resource_type=resource_type, count=len(chunk))
        )


def patient_ref(vendor_patient_id) -> str:
    """The vendor's patient id as the audit trail names it: `<vendor id>` when it is a plain id (a
    vendor's number), "" otherwise (free text never goes into the trail)."""
    text = str(vendor_patient_id or "")
    return text if PATIENT_ID.fullmatch(text) else ""
