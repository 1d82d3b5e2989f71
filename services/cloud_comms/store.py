"""The cloud-comms database: shared collections (access records, security events) and indexes.

Channels keep their own collections (Direct: direct_messages in direct/store.py; eFax: its own).
Queries use $eq equality on every value that came from outside (nx-27017 rules, kit mongo).

Security events are refusals anyone on the network can cause (an unsigned fax callback, a Direct
message from an untrusted signer), so they are aggregated: one `security_events` document per
(channel, code, peer address, UTC minute), upserted on an `_id` derived from that key, counting
the repeats (`count`, `first_at`, `last_at`); the first refusal's details are kept. A flood of
refusals from one peer writes one document a minute, and one log line a minute.
"""

from __future__ import annotations

import hashlib
import logging

from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from services.kit.mongo import IndexSpec, ensure_indexes, now_ms

log = logging.getLogger(__name__)

ACCESS_RECORDS = "access_records"
SECURITY_EVENTS = "security_events"
# Collections whose documents carry outbox events, besides the features' own.
OUTBOX_COLLECTIONS = (ACCESS_RECORDS,)
SECURITY_BUCKET_MS = 60_000


def security_event_id(channel: str, code: str, peer: str, minute: int) -> str:
    """The one document of a (channel, code, peer, minute bucket): the upsert's key."""
    key = f"{channel}\x1f{code}\x1f{peer}\x1f{minute}"
    return "sev_" + hashlib.sha256(key.encode()).hexdigest()[:32]


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

    def record_security_event(self, channel: str, code: str, reason: str, **fields) -> bool:
        """A refused inbound message (not encrypted, bad signature, untrusted signer...): what was
        refused and why, never its content. `fields` are non-PHI columns (peer, agency_id, ...).
        Aggregated per (channel, code, `peer`, minute); True for the first of its minute (logged)."""
        now = now_ms()
        peer = str(fields.get("peer") or "")
        minute = now - now % SECURITY_BUCKET_MS
        first = {**fields, "channel": channel, "code": code, "reason": reason, "peer": peer, "minute": minute}
        update = {"$setOnInsert": {**first, "at": now, "first_at": now}, "$set": {"last_at": now}, "$inc": {"count": 1}}
        doc_id = security_event_id(channel, code, peer, minute)
        try:
            written = self.security_events.update_one({"_id": doc_id}, update, upsert=True)
        except DuplicateKeyError:  # a concurrent first of the same minute inserted it
            written = self.security_events.update_one({"_id": doc_id}, update, upsert=True)
        created = written.upserted_id is not None
        if created:
            log.warning(
                "%s: inbound refused (repeats this minute are counted)", channel, extra={"code": code, "address": peer}
            )
        return created
