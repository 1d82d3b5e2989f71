"""Retention: each agency's policy for old board items and message content, and legal holds.

Policy (agency options, services/inbox/agency_options.py):
- `retention_archive_read_after_days` (0 = never): an item read more than that many days ago is
  moved to the owner's Archive folder (the board's own archive: restorable, counted there, counters
  moved by the same single-item write as a manual archive). Sent copies, hidden items and items
  already archived stay where they are. An item restored from the archive is not archived again.
- `retention_delete_content_after_years` (0 = keep): a message sent more than that many years
  (of 365 days) ago loses its content: subject, body, links and the patient's name are replaced
  by a stub, "Content deleted under retention policy at <time>", on the message and on every
  board item showing it. What remains is the audit stub: ids, times, sender, recipients, patient
  id and when the content was deleted (`content_deleted_at`). Board listings and the reading pane
  show the stub as the subject and body.

Legal holds (admins, audited as `settings_changed` security events; a run that changed something,
and every run asked for, is a `retention_applied` security event with its counts):

    POST   /api/v1/board/legal-holds               {"staff_id": ...} or {"patient_id": ...}, "reason"
    GET    /api/v1/board/legal-holds               the agency's holds
    DELETE /api/v1/board/legal-holds/<hold id>     release

A hold on a staff member suspends deletion of every message they sent or received; a hold on a
patient, of every message about them. Held messages are counted, never changed; they are looked
at again by every run, so content is deleted by the first run after the hold is released.

The job runs per agency (agencies with a stored options document): from inbox's background loop
every `INBOX_RETENTION_INTERVAL_S` (default a day; 0 never), on demand by an admin
(POST /api/v1/board/retention/run, for the admin's agency, `{"dry_run": true}` for a report
only), and from the command line where inbox runs:

    python -m services.inbox.retention --dry-run          # counts per agency, nothing changed
    python -m services.inbox.retention [--agency ID]      # archive and delete, with progress

Age is judged by services/kit/clock.now_ms(). Items are found by range on indexed fields
(`agency_id` + `read_at` on board items, `agency_id` + `sent_at` on messages), in pages. Each
agency keeps watermarks (`retention_state`): items read up to the last archive horizon are not
read again, and messages are read again from the oldest held one (so a released hold is seen).
Every step is repeatable and safe with two runs at once: an archive is a version-guarded item
write that changes nothing for an item already archived, a deletion writes the stub again.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace

from flask import Blueprint, Response, g, request
from pymongo.errors import PyMongoError

from services.inbox import audit, domain
from services.inbox.board import iso
from services.inbox.components import Components, Feature
from services.inbox.http_api import only_query, staff_only
from services.inbox.store import BOARD_ITEMS, MESSAGES, InboxStore
from services.kit import clock
from services.kit.auth import Identity
from services.kit.errors import Conflict, DomainError, Forbidden, InvalidInput, NotFound
from services.kit.events import failure_summary
from services.kit.mongo import IndexSpec, ensure_indexes, now_ms
from services.kit.runtime import every
from services.kit.security_events import SecurityLog
from services.kit.validation import Bool, Id, Str, json_body, path_id, query_int, validate

log = logging.getLogger(__name__)

HOLDS = "legal_holds"
STATE = "retention_state"
OPTIONS = "message_options"
PRODUCER = "inbox"
DAY_MS = 86_400_000
YEAR_MS = 365 * DAY_MS
PAGE = 500
REASON_MAX_CHARS = 500
HOLD_KINDS = ("staff", "patient")
# The folders a message's board items can sit in (by origin: ids are derived from it).
MESSAGE_FOLDERS = (domain.FOLDER_MESSAGES, domain.FOLDER_SENT, domain.FOLDER_PORTAL)
NOT_ARCHIVED = frozenset({domain.FOLDER_ARCHIVE, domain.FOLDER_SENT})

INDEXES = [
    IndexSpec(BOARD_ITEMS, [("agency_id", 1), ("read_at", 1)], name="retention_read"),
    IndexSpec(MESSAGES, [("agency_id", 1), ("sent_at", 1)], name="retention_sent"),
    IndexSpec(HOLDS, [("agency_key", 1), ("sort_key", -1)], name="agency_holds"),
]

HOLD_SPEC = {
    "staff_id": Id(required=False),
    "patient_id": Id(required=False),
    "reason": Str(max_len=REASON_MAX_CHARS, required=False),
}
RUN_SPEC = {"dry_run": Bool()}


# --- pure rules ---------------------------------------------------------------------------------


def hold_id(agency_id: str, kind: str, subject_id: str) -> str:
    """One hold per agency, kind and person (so placing it twice is one hold)."""
    return "lh_" + domain.digest(agency_id, kind, subject_id)[:24]


def archive_horizon(now: int, days: int) -> int | None:
    """Items read at or before this are archived; None: the agency never archives."""
    return now - days * DAY_MS if days > 0 else None


def delete_horizon(now: int, years: int) -> int | None:
    """Messages sent at or before this lose their content; None: the agency keeps content."""
    return now - years * YEAR_MS if years > 0 else None


def is_held(message: dict, staff_holds: set[str], patient_holds: set[str]) -> bool:
    """A hold on its sender, on any recipient, or on the patient it is about keeps a message whole."""
    if message.get("sender_id") in staff_holds or (message.get("patient_id") or "") in patient_holds:
        return True
    return any(staff_id in staff_holds for staff_id in message.get("recipient_ids") or ())


def archivable(item: dict) -> bool:
    """A visible, read item that is not a sent copy and not archived already."""
    return bool(item.get("board")) and bool(item.get("read_at")) and item.get("folder") not in NOT_ARCHIVED


def archive_patch(item: dict, at_ms: int) -> dict | None:
    """Move a read item to the Archive folder (None when it no longer qualifies: repeatable)."""
    if not archivable(item):
        return None
    urgent = bool(item.get("urgent"))
    keys = domain.item_keys(item["agency_id"], item["owner_id"], domain.FOLDER_ARCHIVE, unread=False, urgent=urgent)
    return {**keys, "archived_at": at_ms, "archived_by_retention": at_ms}


STUB_PREFIX = "Content deleted under retention policy at "


def stub_text(at_ms: int) -> str:
    return f"{STUB_PREFIX}{iso(at_ms)}"


def empty_report(agency_id: str, options: dict, dry_run: bool) -> dict:
    return {
        "agency_id": agency_id,
        "dry_run": dry_run,
        "archive_read_after_days": options.get("retention_archive_read_after_days", 0),
        "delete_content_after_years": options.get("retention_delete_content_after_years", 0),
        "archived": 0,
        "deleted": 0,
        "held": 0,
    }


# --- the job ------------------------------------------------------------------------------------


class RetentionJob:
    """The policy applied to one agency at a time; used by the feature and by the command line."""

    def __init__(
        self,
        store: InboxStore,
        cipher,
        options: Callable[[str], dict],
        security: SecurityLog | None = None,
        actor: tuple[str, str] = (PRODUCER, "service"),
    ):
        self.store = store
        self.cipher = cipher
        self.options = options
        # A run that changed something is a `retention_applied` security event of `actor` (id, kind):
        # the service for the scheduled job, the operator for the command line, the admin on demand.
        self.security = security
        self.actor = actor
        self.holds = store.db[HOLDS]
        self.state = store.db[STATE]

    def agencies(self) -> list[str]:
        """Agencies with stored options (only those can have a policy: the defaults keep everything)."""
        return sorted(doc["_id"] for doc in self.store.db[OPTIONS].find({}, projection={"_id": 1}))

    def run_all(self, dry_run: bool = False, progress: Callable[[str], None] | None = None) -> list[dict]:
        """Every agency in turn; one agency's failure (the database, a busy item) is logged and the
        others still run (the next run tries it again)."""
        reports = []
        for agency_id in self.agencies():
            try:
                reports.append(self.run(agency_id, dry_run, progress))
            except (PyMongoError, DomainError) as exc:
                log.warning(
                    "retention run failed for an agency (%s)",
                    failure_summary(exc),
                    extra={"agency_id": agency_id, "error_type": type(exc).__name__},
                )
        return reports

    def run(
        self,
        agency_id: str,
        dry_run: bool = False,
        progress: Callable[[str], None] | None = None,
        actor: tuple[str, str] | None = None,
    ) -> dict:
        """Apply (or, dry, count) the agency's policy: archived/deleted say what was (or would be)
        changed, held how many messages past the horizon a legal hold keeps whole."""
        now = clock.now_ms()
        options = self.options(agency_id)
        report = empty_report(agency_id, options, dry_run)
        state = self.state.find_one({"_id": {"$eq": agency_id}}) or {}
        horizon = archive_horizon(now, report["archive_read_after_days"])
        if horizon is not None:
            report["archived"], through = self._archive(agency_id, horizon, state.get("archived_through", 0), dry_run)
            if not dry_run:
                self.state.update_one({"_id": {"$eq": agency_id}}, {"$max": {"archived_through": through}}, upsert=True)
            if progress:
                progress(f"{agency_id}: {'would archive' if dry_run else 'archived'} {report['archived']} items")
        horizon = delete_horizon(now, report["delete_content_after_years"])
        if horizon is not None:
            deleted, held, through = self._delete(agency_id, horizon, state.get("deleted_through", 0), dry_run)
            report["deleted"], report["held"] = deleted, held
            if not dry_run:
                self.state.update_one({"_id": {"$eq": agency_id}}, {"$max": {"deleted_through": through}}, upsert=True)
            if progress:
                verb = "would delete" if dry_run else "deleted"
                progress(f"{agency_id}: {verb} the content of {deleted} messages, {held} held")
        if not dry_run and (report["archived"] or report["deleted"]):
            log.info(
                "retention applied",
                extra={"agency_id": agency_id, "archived": report["archived"], "deleted": report["deleted"]},
            )
        # Recorded when it changed something, and always for a run someone asked for (`actor`).
        if not dry_run and self.security is not None and (actor or report["archived"] or report["deleted"]):
            actor_id, actor_kind = actor or self.actor
            self.security.record(
                "retention_applied",
                agency_id=agency_id,
                actor_id=actor_id,
                actor_kind=actor_kind,
                outcome="succeeded",
                reason=applied_reason(report),
                target_type="agency",
                target_id=agency_id,
            )
        return report

    # --- archive ---------------------------------------------------------------------------------
    def _archive(self, agency_id: str, horizon: int, after: int, dry_run: bool) -> tuple[int, int]:
        """(archived, watermark): the watermark stops before an item that was too busy to move."""
        count = 0
        busy: int | None = None
        at = now_ms()
        projection = {"_outbox": 0, "subject": 0, "title": 0, "summary": 0, "link": 0}
        for item in _scan(
            self.store.board_items, agency_id, "read_at", after=after, horizon=horizon, projection=projection
        ):
            if not archivable(item):
                continue
            if dry_run:
                count += 1
                continue
            try:
                changed = self.store.change_item(item["_id"], lambda it: archive_patch(it, at))
            except Conflict:  # its owner keeps changing it: the next run moves it
                busy = item["read_at"] if busy is None else busy
                continue
            if changed is not None and changed[0] is not changed[1]:
                count += 1
        return count, horizon if busy is None else max(after, busy - 1)

    # --- delete content -------------------------------------------------------------------------
    def _delete(self, agency_id: str, horizon: int, after: int, dry_run: bool) -> tuple[int, int, int]:
        """(deleted, held, watermark): the watermark stops before the oldest held message."""
        staff_holds, patient_holds = self.hold_sets(agency_id)
        coverers = self.coverers(agency_id)
        deleted = held = 0
        first_held: int | None = None
        projection = {"sender_id": 1, "recipient_ids": 1, "patient_id": 1, "sent_at": 1, "content_deleted_at": 1}
        for message in _scan(
            self.store.messages, agency_id, "sent_at", after=after, horizon=horizon, projection=projection
        ):
            if message.get("content_deleted_at"):
                continue
            if is_held(message, staff_holds, patient_holds):
                held += 1
                first_held = message["sent_at"] if first_held is None else min(first_held, message["sent_at"])
                continue
            if not dry_run:
                try:
                    if not self.delete_content(agency_id, message, coverers):
                        continue  # another run deleted it meanwhile: counted there
                except Conflict:
                    first_held = message["sent_at"] if first_held is None else min(first_held, message["sent_at"])
                    continue
            deleted += 1
        through = horizon if first_held is None else max(after, first_held - 1)
        return deleted, held, through

    def coverers(self, agency_id: str) -> dict[str, set[str]]:
        """Everyone who ever covered for each staff member of the agency (services/inbox/coverage.py):
        their copies of a message carry its content too. One range read of the agency's coverages."""
        found: dict[str, set[str]] = {}
        prefix = f"{agency_id}|"
        query = {"owner_key": {"$gte": prefix, "$lt": prefix + "\uffff"}}
        for doc in self.store.db["coverages"].find(query, projection={"owner_id": 1, "coverer_id": 1}):
            found.setdefault(doc["owner_id"], set()).add(doc["coverer_id"])
        return found

    def delete_content(self, agency_id: str, message: dict, coverers: dict[str, set[str]] | None = None) -> bool:
        """Replace the message's content with the stub: its board items first (coverers' copies
        included), then the message, so an interrupted deletion is finished by the next run (the
        message still has its content). True when this call deleted it (of two runs at once, one)."""
        at = now_ms()
        stub = stub_text(at)
        message_id = message["_id"]
        sealed = self.cipher.seal(agency_id, message_id, "subject", stub)
        owners = {message.get("sender_id") or "", *(message.get("recipient_ids") or ())} - {""}
        owners |= {c for owner in list(owners) for c in (coverers or {}).get(owner, ())}
        ids = [domain.board_item_id(message_id, owner, folder) for owner in owners for folder in MESSAGE_FOLDERS]
        for start in range(0, len(ids), PAGE):
            for item in self.store.items(ids[start : start + PAGE]).values():
                if (item.get("message_id") or item.get("ref_id")) == message_id:
                    # A Conflict (the owner keeps changing it) stops here: the message keeps its
                    # content, so the next run deletes it again, items first.
                    self.store.change_item(item["_id"], lambda it: _stub_patch(it, sealed, at))
        fields = {
            "subject": sealed,
            "body": self.cipher.seal(agency_id, message_id, "body", stub),
            "links": self.cipher.seal(agency_id, message_id, "links", "[]"),
            "content_deleted_at": at,
            "retention_stub": stub,
        }
        done = self.store.messages.update_one(
            {"_id": {"$eq": message_id}, "content_deleted_at": {"$exists": False}},
            {"$set": fields, "$unset": {"patient_name": ""}},
        )
        return done.modified_count == 1

    # --- legal holds -----------------------------------------------------------------------------
    def hold_sets(self, agency_id: str) -> tuple[set[str], set[str]]:
        staff: set[str] = set()
        patients: set[str] = set()
        for hold in self.agency_holds(agency_id):
            (staff if hold["kind"] == "staff" else patients).add(hold["subject_id"])
        return staff, patients

    def agency_holds(self, agency_id: str) -> Iterator[dict]:
        before: str | None = None
        while True:
            page = self.hold_page(agency_id, before, PAGE)
            yield from page
            if len(page) < PAGE:
                return
            before = page[-1]["sort_key"]

    def hold_page(self, agency_id: str, before: str | None, limit: int) -> list[dict]:
        query: dict = {"agency_key": {"$eq": agency_id}}
        if before is not None:
            query["sort_key"] = {"$lt": before}
        return list(self.holds.find(query).sort("sort_key", -1).limit(limit))


def _stub_patch(item: dict, sealed_subject: dict, at: int) -> dict | None:
    if item.get("content_deleted_at"):
        return None
    return {"subject": sealed_subject, "content_deleted_at": at}


def _scan(collection, agency_id: str, field: str, *, after: int, horizon: int, projection: dict) -> Iterator[dict]:
    """Documents of the agency with `after` < field <= `horizon`, oldest first, in pages (a range on
    the agency's index; ties at a page's edge are read again and skipped)."""
    low, seen = after, set()
    while True:
        query = {"agency_id": {"$eq": agency_id}, field: {"$gt": low, "$lte": horizon}}
        if seen:
            query[field] = {"$gte": low, "$lte": horizon}
        page = list(collection.find(query, projection=projection).sort(field, 1).limit(PAGE))
        fresh = [doc for doc in page if not (doc[field] == low and doc["_id"] in seen)]
        yield from fresh
        if len(page) < PAGE or not fresh:
            return
        low = fresh[-1][field]
        seen = {doc["_id"] for doc in page if doc[field] == low}


# --- the feature ------------------------------------------------------------------------------------


class Retention(Feature):
    def __init__(self, components: Components, interval_s: float | None = None):
        super().__init__(components)
        configured = getattr(components.settings, "retention_interval_s", float(DAY_MS // 1000))
        self.interval_s = configured if interval_s is None else interval_s
        self.security = SecurityLog(components.store.db, service=PRODUCER)
        self.job = RetentionJob(components.store, components.cipher, components.options.get, self.security)

    def ensure_indexes(self) -> None:
        ensure_indexes(self.components.store.db, INDEXES)

    def background(self):
        if self.interval_s <= 0:
            return []
        return [("retention", self._run)]

    def _run(self, stop: threading.Event) -> None:
        every(stop, self.interval_s, self.job.run_all, "retention")

    # --- legal holds -----------------------------------------------------------------------------
    def place_hold(self, caller: Identity, fields: dict) -> tuple[dict, bool]:
        _require_admin(caller)
        named = [kind for kind in HOLD_KINDS if fields.get(f"{kind}_id")]
        if len(named) != 1:
            raise InvalidInput("invalid_value", "name exactly one of staff_id and patient_id")
        kind = named[0]
        subject_id = fields[f"{kind}_id"]
        self._check_subject(kind, subject_id)
        agency = caller.agency_id
        hold = hold_id(agency, kind, subject_id)
        existing = self.job.holds.find_one({"_id": {"$eq": hold}})
        if existing is not None:
            return self._hold_view(caller, existing), False
        at = now_ms()
        reason = fields.get("reason") or ""
        doc = {
            "_id": hold,
            "agency_id": agency,
            "agency_key": agency,
            "kind": kind,
            "subject_id": subject_id,
            "reason": self.components.cipher.seal(agency, hold, "reason", reason),
            "placed_by": caller.staff_id,
            "placed_at": at,
            "sort_key": domain.sort_key(at, hold),
        }
        self.job.holds.update_one({"_id": {"$eq": hold}}, {"$setOnInsert": doc}, upsert=True)
        stored = self.job.holds.find_one({"_id": {"$eq": hold}}) or doc
        self._record(caller, hold, f"placed a legal hold on a {kind}")
        return self._hold_view(caller, stored), True

    def release_hold(self, caller: Identity, hold: str) -> None:
        _require_admin(caller)
        doc = self.job.holds.find_one({"_id": {"$eq": hold}})
        if doc is None or doc["agency_id"] != caller.agency_id:
            raise audit.refuse(
                self.components.store,
                caller,
                hold,
                "release",
                resource_type="legal_hold",
                code="legal_hold_not_found",
                message="no such legal hold",
            )
        self.job.holds.delete_one({"_id": {"$eq": hold}, "agency_id": {"$eq": caller.agency_id}})
        self._record(caller, hold, f"released a legal hold on a {doc['kind']}")

    def hold_page(self, caller: Identity, cursor: str | None, limit: int) -> dict:
        _require_admin(caller)
        before = domain.decode_cursor(cursor) if cursor else None
        docs = self.job.hold_page(caller.agency_id, before, limit + 1)
        more = len(docs) > limit
        docs = docs[:limit]
        return {
            "holds": [self._hold_view(caller, doc) for doc in docs],
            "next_cursor": domain.encode_cursor(docs[-1]["sort_key"]) if more else None,
        }

    def _check_subject(self, kind: str, subject_id: str) -> None:
        """The staff member or patient exists in the caller's agency (directory answers for it)."""
        directory = self.components.directory
        if kind == "staff":
            _records, missing = directory.staff([subject_id])
            if missing:
                raise InvalidInput("unknown_staff", "no such staff member in your agency", {"field": "staff_id"})
            return
        try:
            directory.portal_patient(patient_id=subject_id)
        except NotFound as exc:
            raise InvalidInput("unknown_patient", "no such patient in your agency", {"field": "patient_id"}) from exc

    def _hold_view(self, caller: Identity, doc: dict) -> dict:
        return {
            "id": doc["_id"],
            "kind": doc["kind"],
            "staff_id": doc["subject_id"] if doc["kind"] == "staff" else None,
            "patient_id": doc["subject_id"] if doc["kind"] == "patient" else None,
            "reason": self.components.cipher.open(caller.agency_id, doc["_id"], "reason", doc["reason"]),
            "placed_by": doc["placed_by"],
            "placed_at": iso(doc["placed_at"]),
        }

    def _record(self, caller: Identity, hold: str, reason: str) -> None:
        self.security.record(
            "settings_changed",
            agency_id=caller.agency_id,
            actor_id=caller.staff_id,
            actor_kind="staff",
            outcome="succeeded",
            reason=reason,
            target_type="legal_hold",
            target_id=hold,
        )
        log.info("legal hold changed", extra={"agency_id": caller.agency_id, "staff_id": caller.staff_id})

    # --- on demand -------------------------------------------------------------------------------
    def run_for(self, caller: Identity, dry_run: bool) -> dict:
        _require_admin(caller)
        report = self.job.run(caller.agency_id, dry_run, actor=(caller.staff_id, "staff"))
        log.info(
            "retention run on demand",
            extra={"agency_id": caller.agency_id, "staff_id": caller.staff_id, "dry_run": dry_run},
        )
        return report

    # --- routes ---------------------------------------------------------------------------------------
    def blueprint(self):
        bp = Blueprint("retention", __name__, url_prefix="/api/v1/board")

        @bp.post("/legal-holds")
        @staff_only
        def place():
            _require_admin(g.identity)
            made, created = self.place_hold(g.identity, validate(json_body(), HOLD_SPEC))
            return made, 201 if created else 200

        @bp.get("/legal-holds")
        @staff_only
        def listing():
            only_query("cursor", "limit")
            return self.hold_page(g.identity, request.args.get("cursor") or None, query_int("limit", 50, 1, 200))

        @bp.delete("/legal-holds/<hold_id>")
        @staff_only
        def release(hold_id: str):
            self.release_hold(g.identity, path_id(hold_id, "legal hold"))
            return Response(status=204)

        @bp.post("/retention/run")
        @staff_only
        def run():
            _require_admin(g.identity)
            return self.run_for(g.identity, validate(json_body(), RUN_SPEC).get("dry_run", False))

        return bp


def applied_reason(report: dict) -> str:
    """A run's security event says what it changed, in counts only."""
    return f"archived={report['archived']},deleted={report['deleted']},held={report['held']}"


def _require_admin(caller: Identity) -> None:
    if not caller.is_admin:
        raise Forbidden("forbidden", "this action needs the admin role")


# --- the command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from services.inbox import config
    from services.inbox.agency_options import AgencyOptions
    from services.kit import mongo
    from services.kit.bootstrap import phi_cipher
    from services.kit.settings import SettingsError

    parser = argparse.ArgumentParser(prog="python -m services.inbox.retention", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="count what would change; change nothing")
    parser.add_argument("--agency", help="one agency id (default: every agency with stored options)")
    args = parser.parse_args(argv)
    try:
        settings = config.load()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    db = mongo.database(settings.common.mongo_uri, settings.common.mongo_db)
    store = InboxStore(db)
    ensure_indexes(db, INDEXES)
    options = AgencyOptions(SimpleNamespace(store=store))
    try:
        operator = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's arbitrary user)
        operator = ""
    security = SecurityLog(db, service=PRODUCER)
    job = RetentionJob(store, phi_cipher(db, settings.common), options.get, security, actor=(operator, "operator"))

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        agencies = [args.agency] if args.agency else job.agencies()
        reports = [job.run(agency_id, args.dry_run, progress) for agency_id in agencies]
    except DomainError as exc:
        print(f"{exc.code}: {exc.message}", file=sys.stderr)
        return 1
    for report in reports:
        print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
