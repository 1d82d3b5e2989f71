"""Processed-event idempotency for bus consumers: the event ids a consumer has finished.

Lives in the database, not in the bus: `services.kit.bus.Consumer` takes a `ProcessedEvents` as
its `processed=` dependency and asks it which events of a delivery are done and records the ones
it finished. Stored as `{"_id": "<consumer>:<event_id>", "consumer", "processed_at"}` in
`processed_events`; the primary key (`_id`) is the unique index on processed event ids, on
nx-27017 and on MongoDB alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import pymongo.errors
from pymongo.database import Database

from services.kit.mongo import now_ms

__all__ = ["ProcessedEvents"]


class ProcessedEvents:
    """Event ids a consumer has finished, so a redelivered event has its effect once.

    Stored as `{"_id": "<consumer>:<event_id>", "processed_at": <epoch ms>}`: the primary key is
    the uniqueness guarantee on nx-27017 and on MongoDB alike.

    The id is recorded after the handler succeeds, so a crash between the handler's effect and
    the record redelivers the event: handlers must make their own effects idempotent keyed by
    the event id (upsert on a key derived from it, `$setOnInsert`, a unique index) for that window.
    """

    COLLECTION = "processed_events"

    def __init__(self, db: Database, consumer_name: str, collection: str = COLLECTION):
        self.consumer_name = consumer_name
        self._collection = db[collection]

    def _key(self, event_id: str) -> str:
        return f"{self.consumer_name}:{event_id}"

    def seen(self, event_id: str) -> bool:
        return self._collection.find_one({"_id": self._key(event_id)}, {"_id": 1}) is not None

    def record(self, event_id: str) -> bool:
        """Remember the event; False when it was already recorded."""
        try:
            self._collection.insert_one(
                {"_id": self._key(event_id), "consumer": self.consumer_name, "processed_at": now_ms()}
            )
        except pymongo.errors.DuplicateKeyError:
            return False
        return True

    def seen_among(self, event_ids: Sequence[str]) -> set[str]:
        """Which of these events were already processed: one `_id $in` query."""
        if not event_ids:
            return set()
        keys = {self._key(event_id): event_id for event_id in event_ids}
        found = self._collection.find({"_id": {"$in": list(keys)}}, {"_id": 1})
        return {keys[doc["_id"]] for doc in found}

    def record_all(self, event_ids: Sequence[str]) -> None:
        """Remember these events in one write; ones recorded already are left as they are."""
        if not event_ids:
            return
        at = now_ms()
        docs = [{"_id": self._key(e), "consumer": self.consumer_name, "processed_at": at} for e in event_ids]
        try:
            self._collection.insert_many(docs, ordered=False)
        except pymongo.errors.BulkWriteError as exc:
            if any(error.get("code") != 11000 for error in exc.details.get("writeErrors", [])):
                raise
