"""PHI access records: every read of eRx item content (the Pending Rx report, single sign-on into
a patient's chart) leaves `phi.accessed.v1` events, staged in access-record documents (outbox).

One event per item shown (resource type `erx_item`, the item id), so an auditor can tell which
patients' prescriptions a staff member saw; a report's events ride in documents of at most
`EVENTS_PER_RECORD`, one insert each.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.erx_bridge.delivery import PRODUCER
from services.erx_bridge.store import ErxStore
from services.kit.audit import access_record, phi_accessed
from services.kit.auth import Identity

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
) -> None:
    for start in range(0, len(item_ids), EVENTS_PER_RECORD):
        chunk = item_ids[start : start + EVENTS_PER_RECORD]
        events = [
            phi_accessed(
                caller, service=PRODUCER, resource_type=resource_type, resource_id=iid, action=action, outcome=outcome
            )
            for iid in chunk
        ]
        store.record_access(
            access_record(caller, events, action=action, outcome=outcome, resource_type=resource_type, count=len(chunk))
        )
