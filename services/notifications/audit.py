"""PHI access records: every read of a full result (allowed) and every refused access (denied)
becomes a `phi.accessed.v1` event in its own access-record document (services.kit.audit)."""

from __future__ import annotations

import functools

from services.kit.audit import record_resource_access, refuse_resource_access

PRODUCER = "notifications"

# record(store, caller, resource_id, *, resource_type, action="read", outcome="allowed")
record = functools.partial(record_resource_access, producer=PRODUCER)
# refuse(store, caller, resource_id, *, resource_type, code) -> NotFound to raise
refuse = functools.partial(refuse_resource_access, producer=PRODUCER)
