"""The cloud-comms database: shared collections (access records, security events) and indexes.

Channels keep their own collections (Direct: direct_messages in direct/store.py; eFax: its own).
Queries use $eq equality on every value that came from outside (nx-27017 rules, kit mongo).
"""

from __future__ import annotations

from pymongo.database import Database

from services.kit.mongo import IndexSpec, ensure_indexes, now_ms

ACCESS_RECORDS = "access_records"
SECURITY_EVENTS = "security_events"
# Collections whose documents carry outbox events, besides the features' own.
OUTBOX_COLLECTIONS = (ACCESS_RECORDS,)


class CloudCommsStore:
    def __init__(self, db: Database):
        self.db = db
        self.access_records = db[ACCESS_RECORDS]
        self.security_events = db[SECURITY_EVENTS]

    def ensure_indexes(self) -> None:
        ensure_indexes(
            self.db,
            [
                IndexSpec(ACCESS_RECORDS, [("agency_id", 1), ("at", -1)], name="access_by_agency"),
                IndexSpec(SECURITY_EVENTS, [("channel", 1), ("at", -1)], name="security_by_channel"),
            ],
        )

    def record_access(self, doc: dict) -> None:
        self.access_records.insert_one(doc)

    def record_security_event(self, channel: str, code: str, reason: str, **fields) -> None:
        """A refused inbound message (not encrypted, bad signature, untrusted signer...): what was
        refused and why, never its content. `fields` are non-PHI columns (peer, agency_id, ...)."""
        self.security_events.insert_one({"channel": channel, "code": code, "reason": reason, "at": now_ms(), **fields})
