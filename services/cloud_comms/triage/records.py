"""Triage's own storage: one `triage` document per inbound document, and each agency's settings.

`triage` (`_id` = the inbound document's id, `agency_id`, `kind`):
- `suggestion`: sealed JSON (patient id, confidence, matched_on, document type and its confidence,
  the candidates' ids and confidences, where the patient was read); `candidate_ids` and `outcome`
  ("suggested" | "no_match") in clear; `suggested_at`;
- `confirmed` ({patient_id, document_type, by: {id, name} | None (automatic), at}) and
  `confirmed_at`; `routed` ({team_id, team_name, document_type, version, at}): ids only, no PHI;
- `history`: every suggestion, confirmation, correction and routing, oldest first (ids only);
- `version`: every change is conditional on the version it read and increments it, so a staff
  confirmation and the worker's suggestion never overwrite each other; `attempts` of the worker.
A routing's `board_item.delivery_requested.v1` event rides in the same write (kit outbox).

`triage_settings` (`_id` = agency id): `routes` {document type: team id}, `auto_file_confidence`,
`mrn_assigning_authorities` (OIDs whose C-CDA ids are the agency's MRNs), `updated_at`, `updated_by`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from pymongo import ReturnDocument
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from clinic.events.v1.envelope_pb2 import Envelope
from services.kit.crypto import DecryptionError, PhiCipher
from services.kit.mongo import IndexSpec, ensure_indexes, now_ms
from services.kit.outbox import with_outbox

TRIAGE = "triage"
TRIAGE_SETTINGS = "triage_settings"
INDEXES = [IndexSpec(TRIAGE, [("agency_id", 1), ("updated_at", -1)], name="triage_by_agency")]
HISTORY_LIMIT = 100


@dataclass(frozen=True)
class AgencySettings:
    routes: dict[str, str] = field(default_factory=dict)
    auto_file_confidence: float = 0.95
    mrn_assigning_authorities: tuple[str, ...] = ()

    def view(self) -> dict:
        return {
            "routes": dict(self.routes),
            "auto_file_confidence": self.auto_file_confidence,
            "mrn_assigning_authorities": list(self.mrn_assigning_authorities),
        }


class Records:
    def __init__(self, db: Database, cipher: PhiCipher):
        self.db = db
        self.triage = db[TRIAGE]
        self.agency_settings = db[TRIAGE_SETTINGS]
        self.cipher = cipher

    def ensure_indexes(self) -> None:
        ensure_indexes(self.db, INDEXES)

    # --- settings ---------------------------------------------------------------------------------
    def settings(self, agency_id: str, default_confidence: float) -> AgencySettings:
        doc = self.agency_settings.find_one({"_id": {"$eq": agency_id}})
        if doc is None:
            return AgencySettings(auto_file_confidence=default_confidence)
        return AgencySettings(
            dict(doc.get("routes") or {}),
            float(doc.get("auto_file_confidence", default_confidence)),
            tuple(doc.get("mrn_assigning_authorities") or ()),
        )

    def save_settings(self, agency_id: str, settings: AgencySettings, by: str) -> None:
        self.agency_settings.replace_one(
            {"_id": agency_id},
            {
                "_id": agency_id,
                "routes": dict(settings.routes),
                "auto_file_confidence": settings.auto_file_confidence,
                "mrn_assigning_authorities": list(settings.mrn_assigning_authorities),
                "updated_at": now_ms(),
                "updated_by": by,
            },
            upsert=True,
        )

    # --- triage documents -------------------------------------------------------------------------
    def get(self, agency_id: str, document_id: str) -> dict | None:
        return self.triage.find_one(
            {"_id": {"$eq": document_id}, "agency_id": {"$eq": agency_id}}, projection={"_outbox": 0}
        )

    def ensure(self, agency_id: str, document_id: str, kind: str) -> dict:
        """The triage document of `document_id`, created (pending, version 0) when absent."""
        found = self.get(agency_id, document_id)
        if found is not None:
            return found
        now = now_ms()
        doc = {
            "_id": document_id,
            "agency_id": agency_id,
            "kind": kind,
            "version": 0,
            "attempts": 0,
            "history": [],
            "created_at": now,
            "updated_at": now,
        }
        try:
            self.triage.insert_one(doc)
        except DuplicateKeyError:
            return self.get(agency_id, document_id) or doc
        return doc

    def attempt(self, document_id: str) -> int:
        """Count one more try of the worker on the document; the count."""
        doc = self.triage.find_one_and_update(
            {"_id": {"$eq": document_id}},
            {"$inc": {"attempts": 1}},
            projection={"attempts": 1},
            return_document=ReturnDocument.AFTER,
        )
        return int((doc or {}).get("attempts", 1))

    def change(self, doc: dict, changes: dict, history: Sequence[dict] = (), events: Sequence[Envelope] = ()) -> bool:
        """Apply `changes` (and append `history`, stage `events`) if nobody changed the document since
        `doc` was read; False when somebody did (read it again and redo)."""
        entries = [*doc.get("history", []), *history][-HISTORY_LIMIT:]
        update = {"$set": {**changes, "history": entries, "updated_at": now_ms()}, "$inc": {"version": 1}}
        if events:
            update = with_outbox(update, events)
        written = self.triage.update_one({"_id": {"$eq": doc["_id"]}, "version": {"$eq": doc["version"]}}, update)
        return written.modified_count == 1

    # --- the sealed suggestion --------------------------------------------------------------------
    def seal(self, agency_id: str, document_id: str, suggestion: dict) -> bytes:
        return self.cipher.seal(agency_id, document_id, "suggestion", json.dumps(suggestion))

    def suggestion(self, doc: dict) -> dict | None:
        if "suggestion" not in doc:
            return None
        try:
            return json.loads(self.cipher.open(doc["agency_id"], doc["_id"], "suggestion", doc["suggestion"]))
        except (DecryptionError, ValueError):
            return None
