"""The inbound documents triage reads: received Direct messages (`direct_messages`, ids `dm_...`)
and received faxes (`faxes`, ids `fax_...`), stored by their own features, which mark each one with
`triage_due_at` (epoch ms) at insert.

Triage reads them through their features only (DirectMessaging.opened and .stored_attachments for
a message; Faxes.stored_caller and .stored_pdf for a fax). A source whose feature is not attached
is not read.

Triage reads a fax's `is_test` (the provider's test flag) and never files or routes a test fax.
Triage writes two things on them: it moves `triage_due_at` forward (the worker's lease, a
conditional update) and removes it when done; and it adds the members of the team a document was
routed to to its recipients (`staff_ids` / `recipient_ids`), so that the document's own view opens
for them as for the staff it was first delivered to.
"""

from __future__ import annotations

from dataclasses import dataclass

from pymongo.collection import Collection

from services.cloud_comms.direct.feature import DIRECT_MESSAGES, DirectMessaging
from services.cloud_comms.fax.feature import FAXES, Faxes, board_title
from services.kit.mongo import IndexSpec

DUE = "triage_due_at"
INDEXES = [
    IndexSpec(DIRECT_MESSAGES, [(DUE, 1)], name="direct_triage_due"),
    IndexSpec(FAXES, [(DUE, 1)], name="faxes_triage_due"),
]


@dataclass(frozen=True)
class Source:
    kind: str  # "direct" | "fax"
    prefix: str  # of its document ids
    feature: type
    collection: Collection
    recipients: str  # the field listing the staff it was delivered to
    view_path: str  # the staff view of one document, + id
    link_label: str


@dataclass(frozen=True)
class Content:
    """What triage reads of one document (PHI: never stored in clear, never logged)."""

    title: str  # the board item title its feature gave it
    body: str
    files: list[tuple[str, str, bytes]]  # (filename, content type, bytes)
    is_test: bool = False  # a provider's test fax (`faxes.is_test`): suggested, never filed or routed


class Sources:
    def __init__(self, components):
        db = components.store.db
        self.components = components
        self.known = (
            Source(
                "direct",
                "dm_",
                DirectMessaging,
                db[DIRECT_MESSAGES],
                "staff_ids",
                "/api/v1/cloud/direct/",
                "Open message",
            ),
            Source("fax", "fax_", Faxes, db[FAXES], "recipient_ids", "/api/v1/cloud/faxes/", "View fax"),
        )

    @property
    def all(self) -> list[Source]:
        """The sources whose feature is attached."""
        return [s for s in self.known if self.components.feature(s.feature) is not None]

    def of(self, document_id: str) -> Source | None:
        """The source of a document id, by its prefix; None for any other id."""
        return next((s for s in self.all if document_id.startswith(s.prefix)), None)

    def delivered(self, source: Source, agency_id: str, document_id: str, staff_id: str) -> dict | None:
        """The document (without content) when it is the agency's and was delivered to `staff_id`."""
        doc = source.collection.find_one(
            {"_id": {"$eq": document_id}, "agency_id": {"$eq": agency_id}},
            projection={"_id": 1, "agency_id": 1, source.recipients: 1},
        )
        return doc if doc is not None and staff_id in doc.get(source.recipients, []) else None

    def load(self, source: Source, document_id: str) -> dict | None:
        return source.collection.find_one({"_id": {"$eq": document_id}}, projection={"_outbox": 0})

    def read(self, source: Source, doc: dict) -> Content:
        """The document's title, text and files, decrypted. Raises DecryptionError or Unavailable
        (`unreadable`) when it cannot be opened."""
        feature = self.components.feature(source.feature)
        if source.kind == "fax":
            caller = feature.stored_caller(doc)
            pdf = feature.stored_pdf(doc)
            title = board_title(caller.get("from_number", ""))
            return Content(title, "", [("fax.pdf", "application/pdf", pdf)], is_test=bool(doc.get("is_test")))
        content = feature.opened(doc)
        title = f"Direct: {content.get('subject') or '(no subject)'}"[:200]
        return Content(title, content.get("text", ""), feature.stored_attachments(doc))

    def is_test(self, source: Source, document_id: str) -> bool:
        """A provider's test fax (`is_test` of `faxes`, read only): never filed automatically or routed."""
        if source.kind != "fax":
            return False
        doc = source.collection.find_one({"_id": {"$eq": document_id}}, projection={"is_test": 1})
        return bool((doc or {}).get("is_test"))

    def due(self, source: Source, now: int, limit: int) -> list[dict]:
        found = source.collection.find({DUE: {"$lte": now}}, projection={"_id": 1, "agency_id": 1, DUE: 1})
        return list(found.sort(DUE, 1).limit(limit))

    def claim(self, source: Source, doc: dict, lease_until: int) -> bool:
        """Take one due document until `lease_until` (ms); False when another worker took it first."""
        claimed = source.collection.update_one(
            {"_id": {"$eq": doc["_id"]}, DUE: {"$eq": doc[DUE]}}, {"$set": {DUE: lease_until}}
        )
        return claimed.modified_count == 1

    def done(self, source: Source, document_id: str, lease_until: int) -> None:
        """The document is triaged: no longer due (unless marked again since the claim)."""
        source.collection.update_one({"_id": {"$eq": document_id}, DUE: {"$eq": lease_until}}, {"$unset": {DUE: ""}})

    def grant(self, source: Source, agency_id: str, document_id: str, staff_ids: list[str]) -> None:
        """Add staff (a routed team's members) to the document's recipients."""
        source.collection.update_one(
            {"_id": {"$eq": document_id}, "agency_id": {"$eq": agency_id}},
            {"$addToSet": {source.recipients: {"$each": list(staff_ids)}}},
        )
