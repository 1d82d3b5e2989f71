"""The notifications database: shared collections (access records) and index creation.

Features keep their own collections (lab results in lab.py); every query shape is listed in
docs/storage.md.
"""

from __future__ import annotations

from pymongo.database import Database

from services.kit.mongo import IndexSpec, ensure_indexes

ACCESS_RECORDS = "access_records"
# Collections whose documents carry outbox events, besides the features' own.
OUTBOX_COLLECTIONS = (ACCESS_RECORDS,)


class NotificationsStore:
    def __init__(self, db: Database):
        self.db = db
        self.access_records = db[ACCESS_RECORDS]

    def ensure_indexes(self) -> None:
        ensure_indexes(self.db, [IndexSpec(ACCESS_RECORDS, [("agency_id", 1), ("at", -1)], name="access_by_agency")])

    def record_access(self, doc: dict) -> None:
        self.access_records.insert_one(doc)
