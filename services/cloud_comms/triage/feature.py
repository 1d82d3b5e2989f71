"""Automatic triage of inbound Direct messages and faxes: which roster patient a document is about
and what kind of document it is, suggested on the document, confirmed or corrected by staff in one
click, and routed by document type to the team the agency chose.

The worker (`cloud-triage`, every CLOUD_TRIAGE_PASS_S) claims documents their features marked with
`triage_due_at` (a conditional update moves it forward: the lease), reads them (sources.py),
extracts what they say (extract.py), scores the roster (roster.py, match.py), classifies them
(classify.py), stores a sealed suggestion (records.py) and clears the mark. A document that cannot
be read is `no_match`; a try that fails otherwise is retried when its lease ends, at most
CLOUD_TRIAGE_MAX_ATTEMPTS times, then `no_match`.

Filing: a suggestion whose patient confidence and document-type confidence both reach the agency's
auto-file threshold, of a type the agency routes, with no reason for review (several patients, a
part not read, a suffix the roster lacks, a test fax), is confirmed automatically (by nobody) and
routed. A test fax is never routed, even when staff confirm it.
Anything else waits for a staff member it was delivered to. Routing delivers one board item per
member of the team (source "triage", source_ref the document id, the original's title and link) and
adds the members to the document's recipients; a document is routed once per team: a correction to
a type routed elsewhere moves the item to the new team (the same source_ref, a higher version).
Every read of triage data and of the roster is audited (phi.accessed.v1).
"""

from __future__ import annotations

import logging
import threading

from flask import Blueprint, g, request

from services.cloud_comms import audit, delivery
from services.cloud_comms.components import Feature
from services.cloud_comms.triage import api, classify, match
from services.cloud_comms.triage.extract import document
from services.cloud_comms.triage.match import MIN_SUGGESTED
from services.cloud_comms.triage.records import TRIAGE, AgencySettings, Records
from services.cloud_comms.triage.roster import BlindIndex, Roster
from services.cloud_comms.triage.sources import INDEXES as SOURCE_INDEXES
from services.cloud_comms.triage.sources import Source, Sources
from services.kit.auth import Identity
from services.kit.crypto import DecryptionError
from services.kit.errors import Conflict, Forbidden, InvalidInput, Unavailable
from services.kit.http import require_staff
from services.kit.mongo import ensure_indexes, now_ms
from services.kit.service_identity import acting_as

log = logging.getLogger(__name__)

SOURCE = "triage"
RESOURCE_TRIAGE, RESOURCE_PATIENT = "triage", "patient"
PARTLY_READ, TEST_FAX = "partly_read", "test_fax"
BATCH = 20
WRITE_TRIES = 5


class Triage(Feature):
    outbox_collections = (TRIAGE,)

    def __init__(self, components):
        super().__init__(components)
        db = components.store.db
        self.settings = components.settings.triage
        self.roster = Roster(db, components.cipher, BlindIndex(self.settings.index_key))
        self.records = Records(db, components.cipher)
        self.sources = Sources(components)

    def ensure_indexes(self) -> None:
        self.roster.ensure_indexes()
        self.records.ensure_indexes()
        ensure_indexes(self.components.store.db, SOURCE_INDEXES)

    def attach(self) -> None:
        if not self.components.settings.common.production:
            counts = self.roster.seed_demo()
            log.info("demo roster seeded", extra={"count": counts["created"] + counts["updated"]})

    def background(self):
        return [("cloud-triage", self.run)]

    def agency_settings(self, agency_id: str) -> AgencySettings:
        return self.records.settings(agency_id, self.settings.auto_file_confidence)

    # --- the worker -------------------------------------------------------------------------------
    def run(self, stop_event: threading.Event) -> None:
        while not stop_event.is_set():
            try:
                self.triage_pass()
            except Exception as exc:  # noqa: BLE001 - the next pass tries again; the type only (no PHI)
                log.warning("triage pass failed", extra={"error_type": type(exc).__name__})
            stop_event.wait(self.settings.pass_s)

    def triage_pass(self) -> int:
        """Triage every due document (a batch per source); the number triaged."""
        done = 0
        for source in self.sources.all:
            now = now_ms()
            for due in self.sources.due(source, now, BATCH):
                lease = now + int(self.settings.lease_s * 1000)
                if not self.sources.claim(source, due, lease):
                    continue
                try:
                    self.triage_one(source, due["_id"], due["agency_id"])
                except Exception as exc:  # noqa: BLE001 - retried when the lease ends, bounded by attempts
                    log.warning("triage failed", extra={"item_id": due["_id"], "error_type": type(exc).__name__})
                    continue
                self.sources.done(source, due["_id"], lease)
                done += 1
        return done

    def triage_one(self, source: Source, document_id: str, agency_id: str) -> None:
        record = self.records.ensure(agency_id, document_id, source.kind)
        doc = self.sources.load(source, document_id)
        if doc is None:
            return
        if self.records.attempt(document_id) > self.settings.max_attempts:
            if not record.get("suggested_at"):  # a suggestion made before the failures is kept
                self._suggest(record, api.no_suggestion("too_many_attempts"))
            return
        try:
            content = self.sources.read(source, doc)
        except (DecryptionError, Unavailable, KeyError, ValueError):
            log.warning("triage: document unreadable", extra={"item_id": document_id})
            self._suggest(record, api.no_suggestion("unreadable"))
            return
        suggestion = self.analyse(agency_id, content)
        if self._files_automatically(record, suggestion):
            # The suggestion and the filing in one write: no reader sees it suggested in between.
            try:
                self.file(
                    source,
                    record,
                    suggestion["patient_id"],
                    suggestion["document_type"],
                    by=None,
                    title=content.title,
                    suggested=suggestion,
                )
            except Exception:
                self._suggest(record, suggestion)  # kept for staff while the filing is retried
                raise
            log.info("triage filed automatically", extra={"item_id": record["_id"], "agency_id": agency_id})
        else:
            self._suggest(record, suggestion)

    def analyse(self, agency_id: str, content) -> dict:
        """The suggestion for one document's content (patient candidates and document type). It is
        capped below any auto-file threshold, with its reasons, when the document names several
        patients or was not read whole; a test fax is flagged (it is never filed or routed)."""
        found = document(content.body, content.files)
        kind = classify.classify(found.code, found.title, found.text)
        authorities = self.agency_settings(agency_id).mrn_assigning_authorities
        matches = self.roster.candidates(agency_id, found, authorities)
        document_flags = [
            flag
            for flag, present in (
                (match.MULTIPLE_PATIENTS, match.several_patients(found.patients)),
                (PARTLY_READ, not found.complete),
            )
            if present
        ]
        for flag in document_flags:
            matches = match.capped(matches, match.REVIEW_CAP, flag)
        best = matches[0] if matches and matches[0].confidence >= MIN_SUGGESTED else None
        reasons = list(dict.fromkeys([*(matches[0].flags if matches else ()), *document_flags]))
        if content.is_test:
            reasons.append(TEST_FAX)
        return {
            "patient_id": best.patient_id if best else None,
            "confidence": best.confidence if best else 0.0,
            "matched_on": list(best.matched_on) if best else [],
            "document_type": kind.document_type,
            "document_type_confidence": kind.confidence,
            "candidates": [
                {"id": m.patient_id, "confidence": m.confidence, "matched_on": list(m.matched_on)} for m in matches
            ],
            "read_from": found.source,
            "multiple_patients": match.MULTIPLE_PATIENTS in reasons,
            "reasons": reasons,
        }

    def _suggest(self, record: dict, suggestion: dict) -> dict:
        for _ in range(WRITE_TRIES):
            changes, entry = self._suggestion_changes(record, suggestion)
            if self.records.change(record, changes, [entry]):
                return self.records.get(record["agency_id"], record["_id"]) or record
            record = self.records.get(record["agency_id"], record["_id"]) or record
        raise Conflict("triage_changed", "the triage record kept changing")

    def _suggestion_changes(self, record: dict, suggestion: dict) -> tuple[dict, dict]:
        outcome = "suggested" if suggestion["patient_id"] else "no_match"
        changes = {
            "suggestion": self.records.seal(record["agency_id"], record["_id"], suggestion),
            "candidate_ids": [c["id"] for c in suggestion["candidates"]],
            "outcome": outcome,
            "suggested_at": now_ms(),
        }
        entry = api.history_entry(
            outcome, None, suggestion["patient_id"], suggestion["document_type"], confidence=suggestion["confidence"]
        )
        return changes, entry

    def _files_automatically(self, record: dict, suggestion: dict) -> bool:
        """Nobody confirmed it yet, no review reason, both confidences at the agency's threshold and
        its type routed to a team."""
        settings = self.agency_settings(record["agency_id"])
        threshold = settings.auto_file_confidence
        if record.get("confirmed_at") or not suggestion["patient_id"] or suggestion.get("reasons"):
            return False
        if suggestion["confidence"] < threshold or suggestion["document_type_confidence"] < threshold:
            return False
        return suggestion["document_type"] in settings.routes

    # --- filing (confirm, correct, automatic) -----------------------------------------------------
    def file(
        self,
        source: Source,
        record: dict,
        patient_id: str | None,
        document_type: str,
        *,
        by: dict | None,
        title=None,
        suggested: dict | None = None,
    ) -> dict:
        """Confirm `patient_id` and `document_type` for the document (by a staff member `by`, or
        automatically when None, then with the worker's new suggestion `suggested` in the same
        write) and route it if its type is routed to a team it was not yet routed to; the triage
        document after the write."""
        agency_id, document_id = record["agency_id"], record["_id"]
        for _ in range(WRITE_TRIES):
            suggestion = suggested or self.records.suggestion(record) or {}
            same = suggestion.get("patient_id") == patient_id and suggestion.get("document_type") == document_type
            action = "filed_automatically" if by is None else "confirmed" if same else "corrected"
            at = now_ms()
            changes, history = {}, []
            if suggested is not None:
                changes, entry = self._suggestion_changes(record, suggested)
                history.append(entry)
            changes.update(
                {
                    "confirmed": {"patient_id": patient_id, "document_type": document_type, "by": by, "at": at},
                    "confirmed_at": at,
                }
            )
            history.append(api.history_entry(action, by, patient_id, document_type))
            routed, events, entries = self._route(source, record, document_type, by, title)
            if routed is not None:
                changes["routed"] = routed
            if self.records.change(record, changes, [*history, *entries], events):
                return self.records.get(agency_id, document_id) or record
            record = self.records.get(agency_id, document_id) or record
        raise Conflict("triage_changed", "the document's triage changed meanwhile; try again")

    def _route(self, source: Source, record: dict, document_type: str, by: dict | None, title: str | None):
        """(routed, [delivery event], [history entry]) when the type is routed to a team the
        document has not reached yet; (None, [], [a "not_routed" entry]) when that team is gone or
        has no active member; (None, [], []) when there is nothing to route."""
        agency_id, document_id = record["agency_id"], record["_id"]
        team_id = self.agency_settings(agency_id).routes.get(document_type)
        routed = record.get("routed") or {}
        if not team_id or routed.get("team_id") == team_id:
            return None, [], []
        if self.sources.is_test(source, document_id):
            return None, [], [api.history_entry("not_routed", by, None, document_type, team_id=team_id)]
        with acting_as(self.components.service_tokens.identity(agency_id)):
            team = self.components.directory.team(agency_id, team_id)
        members = list(team.staff_ids) if team else []
        if not members:
            log.warning("triage: routed team is gone or has no active members", extra={"item_id": document_id})
            return None, [], [api.history_entry("not_routed", by, None, document_type, team_id=team_id)]
        if title is None:
            doc = self.sources.load(source, document_id)
            title = self.sources.read(source, doc).title if doc is not None else ""
        self.sources.grant(source, agency_id, document_id, members)
        version = int(routed.get("version", 0)) + 1
        label = classify.LABELS[document_type]
        filed_by = "filed automatically" if by is None else f"filed by {by['name'] or 'staff'}"
        item = delivery.request(
            source=SOURCE,
            source_ref=document_id,
            delivery_id=f"{document_id}-{version}",
            staff_ids=members,
            title=f"{label}: {title}"[:200],
            summary=f"{label} · {filed_by}"[:200],
            url=f"{self.components.settings.public_url}{source.view_path}{document_id}",
            link_label=source.link_label,
            source_version=version,
        )
        event = delivery.delivery_requested(agency_id, item, f"tri_{document_id}_{version}")
        at = now_ms()
        routed = {
            "team_id": team_id,
            "team_name": team.name,
            "document_type": document_type,
            "version": version,
            "at": at,
        }
        return routed, [event], [api.history_entry("routed", by, None, document_type, team_id=team_id)]

    # --- staff ------------------------------------------------------------------------------------
    def _delivered(self, caller: Identity, document_id: str) -> Source:
        source = self.sources.of(document_id)
        if source is None or self.sources.delivered(source, caller.agency_id, document_id, caller.staff_id) is None:
            raise audit.refuse(
                self.components.store, caller, document_id, resource_type=RESOURCE_TRIAGE, code="document_not_found"
            )
        return source

    def view(self, caller: Identity, document_id: str) -> dict:
        """The document's triage with the patients it shows; recorded in one access record: the
        document, naming the patient it is filed to (or suggested for), and each patient shown."""
        source = self._delivered(caller, document_id)
        record = self.records.get(caller.agency_id, document_id)
        suggestion = self.records.suggestion(record) if record else None
        shown = self._render(source, record, document_id, caller.agency_id, suggestion)
        filed = ((record or {}).get("confirmed") or {}).get("patient_id") or (suggestion or {}).get("patient_id")
        audit.record_with_patients(
            self.components.store,
            caller,
            document_id,
            resource_type=RESOURCE_TRIAGE,
            patient_id=filed or "",
            shown=api.patient_ids(record, suggestion),
        )
        return shown

    def _render(
        self, source: Source, record: dict | None, document_id: str, agency_id: str, suggestion: dict | None = None
    ) -> dict:
        if suggestion is None and record:
            suggestion = self.records.suggestion(record)
        ids = api.patient_ids(record, suggestion)
        patients = self.roster.get(agency_id, ids)
        return api.view(source.kind, document_id, record, suggestion, patients)

    def confirm(self, caller: Identity, document_id: str, body: dict) -> dict:
        choice = api.confirmation(body)
        source = self._delivered(caller, document_id)
        patient_id = choice.get("patient_id")
        if patient_id is not None and not self.roster.exists(caller.agency_id, patient_id):
            raise InvalidInput(
                "unknown_patient", "patient_id is not a patient of the agency's roster", {"field": "patient_id"}
            )
        record = self.records.ensure(caller.agency_id, document_id, source.kind)
        by = {"id": caller.staff_id, "name": caller.name}
        record = self.file(source, record, patient_id, choice["document_type"], by=by)
        audit.record(self.components.store, caller, document_id, resource_type=RESOURCE_TRIAGE, action="update")
        return self._render(source, record, document_id, caller.agency_id)

    def search(self, caller: Identity, q: str) -> dict:
        patients = self.roster.search(caller.agency_id, api.search_text(q))
        api.record_search(self.components.store, caller, [p.id for p in patients])
        return {"patients": [p.view() for p in patients]}

    # --- admins -----------------------------------------------------------------------------------
    @staticmethod
    def _admin(caller: Identity) -> Identity:
        if not caller.is_admin:
            raise Forbidden("admin_only", "only agency admins manage the roster and triage settings")
        return caller

    def import_patients(self, caller: Identity, body: dict) -> dict:
        self._admin(caller)
        records = api.roster_import(body)
        counts = self.roster.upsert(caller.agency_id, records)
        audit.record(self.components.store, caller, "patients", resource_type=RESOURCE_PATIENT, action="import")
        log.info("roster imported", extra={"agency_id": caller.agency_id, "count": len(records)})
        return {"imported": len(records), **counts}

    def get_settings(self, caller: Identity) -> dict:
        return self.agency_settings(self._admin(caller).agency_id).view()

    def put_settings(self, caller: Identity, body: dict) -> dict:
        current = self.agency_settings(self._admin(caller).agency_id)
        wanted = api.settings_change(body, current)
        for team_id in dict.fromkeys(wanted.routes.values()):
            with acting_as(self.components.service_tokens.identity(caller.agency_id)):
                if self.components.directory.team(caller.agency_id, team_id) is None:
                    raise InvalidInput("unknown_team", f"no team {team_id} in the agency", {"field": "routes"})
        self.records.save_settings(caller.agency_id, wanted, caller.staff_id)
        return wanted.view()

    def blueprints(self) -> list:
        triage = Blueprint("cloud_triage", __name__, url_prefix="/api/v1/cloud/triage")

        @triage.get("/settings")
        @require_staff
        def settings_view():
            return self.get_settings(g.identity)

        @triage.put("/settings")
        @require_staff
        def settings_change():
            return self.put_settings(g.identity, api.body())

        @triage.get("/<document_id>")
        @require_staff
        def view(document_id: str):
            return self.view(g.identity, api.document_id(document_id))

        @triage.post("/<document_id>/confirm")
        @require_staff
        def confirm(document_id: str):
            return self.confirm(g.identity, api.document_id(document_id), api.body())

        patients = Blueprint("cloud_patients", __name__, url_prefix="/api/v1/cloud/patients")

        @patients.get("")
        @require_staff
        def search():
            return self.search(g.identity, request.args.get("q", ""))

        @patients.post("")
        @require_staff
        def import_patients():
            return self.import_patients(g.identity, api.body())

        return [triage, patients]
