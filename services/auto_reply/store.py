"""auto-reply's own database: settings, claimed reply slots, access records (see docs/storage.md).

- `settings`: one document per (agency, staff member, kind), `_id` = "<agency>|<staff>|<kind>"; the
  message text is sealed (PHI-capable). While it is on, `away_agency` = agency and `away_until` = its
  end (or FOREVER), so "who is away now" is one indexed range query.
- `reply_slots`: one document per answer, `_id` = the slot key (replier, kind, sender, activation,
  day): the primary key is the unique index that makes an answer happen once. It keeps the answer
  as it was claimed (sealed text, the message answered, inbox's idempotency key) so a retry sends
  exactly the same thing; `sent_at` 0 until inbox confirmed the send.
- `processed_events`: the bus consumer's processed event ids (services.kit.processed_events.ProcessedEvents).
- `access_records`: reads of the message text, each carrying its `phi.accessed.v1` event (outbox).
"""

from __future__ import annotations

from pymongo import ASCENDING
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from services.auto_reply import domain
from services.kit.crypto import PhiCipher
from services.kit.mongo import IndexSpec, ensure_indexes, now_ms

SETTINGS = "settings"
SLOTS = "reply_slots"
ACCESS_RECORDS = "access_records"
OUTBOX_COLLECTIONS = (ACCESS_RECORDS,)
FOREVER = 9_999_999_999_999  # `away_until` of a setting on until turned off
AWAY_PAGE_MAX = 1000

INDEXES = [
    IndexSpec(SETTINGS, [("away_agency", ASCENDING), ("away_until", ASCENDING)], name="settings_away"),
]


def setting_id(agency_id: str, staff_id: str, kind: str) -> str:
    return f"{agency_id}|{staff_id}|{kind}"


class AutoReplyStore:
    def __init__(self, db: Database, cipher: PhiCipher):
        self.db = db
        self.cipher = cipher
        self.settings = db[SETTINGS]
        self.slots = db[SLOTS]
        self.access_records = db[ACCESS_RECORDS]

    def ensure_indexes(self) -> None:
        ensure_indexes(self.db, INDEXES)

    # --- settings ------------------------------------------------------------------------------
    def setting(self, agency_id: str, staff_id: str, kind: str) -> domain.Setting | None:
        doc = self.settings.find_one({"_id": {"$eq": setting_id(agency_id, staff_id, kind)}})
        return None if doc is None else self._setting(doc)

    def settings_of(self, agency_id: str, staff_id: str) -> dict[str, domain.Setting]:
        """Both kinds of one staff member (those ever saved), in one primary-key read."""
        ids = [setting_id(agency_id, staff_id, kind) for kind in domain.KINDS]
        return {doc["kind"]: self._setting(doc) for doc in self.settings.find({"_id": {"$in": ids}})}

    def save(self, setting: domain.Setting) -> None:
        doc_id = setting_id(setting.agency_id, setting.staff_id, setting.kind)
        fields = {
            "agency_id": setting.agency_id,
            "staff_id": setting.staff_id,
            "kind": setting.kind,
            "enabled": int(setting.enabled),
            "message": self.cipher.seal(setting.agency_id, doc_id, "message", setting.message),
            "starts_at": setting.starts_at,
            "ends_at": setting.ends_at,
            "time_zone": setting.time_zone,
            "activation_id": setting.activation_id,
            "activated_at": setting.activated_at,
            "updated_at": setting.updated_at,
            # Listed by "who is away" while on; a finished window falls out of the range query.
            "away_agency": setting.agency_id if setting.enabled else None,
            "away_until": (setting.ends_at or FOREVER) if setting.enabled else 0,
        }
        self.settings.update_one({"_id": {"$eq": doc_id}}, {"$set": fields}, upsert=True)

    def _setting(self, doc: dict) -> domain.Setting:
        return domain.Setting(
            agency_id=doc["agency_id"],
            staff_id=doc["staff_id"],
            kind=doc["kind"],
            enabled=bool(doc.get("enabled")),
            message=self.cipher.open(doc["agency_id"], doc["_id"], "message", doc["message"]),
            starts_at=doc.get("starts_at"),
            ends_at=doc.get("ends_at"),
            time_zone=doc.get("time_zone") or "UTC",
            activation_id=doc.get("activation_id") or "",
            activated_at=int(doc.get("activated_at") or 0),
            updated_at=int(doc.get("updated_at") or 0),
        )

    def away(self, agency_id: str, now: int, limit: int = AWAY_PAGE_MAX) -> list[dict]:
        """Settings of the agency that are on and not yet over (no text is read)."""
        cursor = self.settings.find(
            {"away_agency": {"$eq": agency_id}, "away_until": {"$gt": now}},
            {"message": 0},
        ).limit(limit)
        return list(cursor)

    # --- reply slots ---------------------------------------------------------------------------
    def claim(self, slot: str, agency_id: str, fields: dict, message: str) -> tuple[dict, bool]:
        """Claim the slot for this answer: (the slot document, True) when this call claimed it, or
        (the document an earlier claim wrote, False)."""
        doc = {
            "_id": slot,
            "agency_id": agency_id,
            "message": self.cipher.seal(agency_id, slot, "message", message),
            "claimed_at": now_ms(),
            "sent_at": 0,
            **fields,
        }
        try:
            self.slots.insert_one(doc)
            return doc, True
        except DuplicateKeyError:
            existing = self.slots.find_one({"_id": {"$eq": slot}})
            if existing is None:  # released between our insert and read: claim again
                return self.claim(slot, agency_id, fields, message)
            return existing, False

    def slot_message(self, slot_doc: dict) -> str:
        return self.cipher.open(slot_doc["agency_id"], slot_doc["_id"], "message", slot_doc["message"])

    def mark_sent(self, slot: str, reply_message_id: str) -> None:
        self.slots.update_one(
            {"_id": {"$eq": slot}, "sent_at": {"$eq": 0}},
            {"$set": {"sent_at": now_ms(), "reply_message_id": reply_message_id}},
        )

    def release(self, slot: str, event_id: str) -> bool:
        """Give up an unsent claim that inbox refused for good, so a later message may be answered."""
        result = self.slots.delete_one({"_id": {"$eq": slot}, "event_id": {"$eq": event_id}, "sent_at": {"$eq": 0}})
        return result.deleted_count == 1

    def slot(self, slot: str) -> dict | None:
        return self.slots.find_one({"_id": {"$eq": slot}})

    # --- audit ---------------------------------------------------------------------------------
    def record_access(self, doc: dict) -> None:
        self.access_records.insert_one(doc)
