"""Lab Report Notifications: results from HL7 v2 ORU^R01 (MLLP) and FHIR R4 DiagnosticReport (gateway)
onto the boards of the agency's staff flagged Lab Result Notification, and the audited full view.

Storage: one `lab_results` document per received (message, order). Its id is derived from the
message's identity (HL7: sending facility + MSH-10 + a digest of its content + the order's
position; FHIR: partner, agency and the resource's digest), so the same message twice is stored
once (the _id is unique) and answered AA both times, while a sender reusing a control id for other
content (common after an interface engine restarts) has that content stored, never acknowledged
and dropped. The document holds the full result sealed (kit crypto, per-agency key), the clear
fields needed to find and show it (order id, version, status, severity, recipients), and its
`board_item.delivery_requested.v1` event (outbox): the write that stores the result is the write
that asks for its delivery, and the ACK is sent after it. Every message about one order shares the
order id (`source_ref`; the order of one patient), so preliminary -> final -> corrected updates one
board item (higher `source_version`: result status first, then time; marked unread again and moved
to the top of the list).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import zoneinfo

from flask import Blueprint, g
from pymongo import DESCENDING
from pymongo.errors import DuplicateKeyError

from clinic.inbox.v1 import inbox_pb2
from services.kit.auth import Identity
from services.kit.crypto import DecryptionError
from services.kit.errors import DomainError, Unavailable
from services.kit.http import require_staff as staff_only
from services.kit.mongo import IndexSpec, ensure_indexes, now_ms
from services.kit.outbox import outbox_fields
from services.kit.runtime import every
from services.kit.service_identity import acting_as
from services.kit.validation import json_body, path_id
from services.notifications import audit, hl7v2
from services.notifications.components import Feature
from services.notifications.delivery import SEVERITIES, delivery_requested
from services.notifications.fhir import body_digest, parse_report
from services.notifications.fhir_errors import MAX_DEPTH, answer_errors_in_fhir
from services.notifications.lab_domain import LabReport, board_summary, board_title
from services.notifications.lab_hl7 import reports_from_oru
from services.notifications.registrations import gateway_consumer

log = logging.getLogger(__name__)

LAB_RESULTS = "lab_results"
SOURCE = "lab"
RESOURCE_TYPE = "lab_result"
WARM_IDLE_S = 600.0  # an agency with no result for this long is no longer kept warm
INDEXES = [
    IndexSpec(
        LAB_RESULTS, [("agency_id", 1), ("order_id", 1), ("version", -1), ("received_at", -1)], name="lab_by_order"
    )
]


def digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def order_id(agency_id: str, report: LabReport) -> str:
    """One order of one patient, whatever its versions: the board item's source_ref and the full
    view's id. The patient is part of it: a result withdrawn from the wrong patient and sent again
    under the right one (same order number) is two items, the withdrawal visible on the first."""
    return "lab_" + digest(agency_id, report.origin, report.order_number, report.patient_ref)


def result_id(message_key: str, index: int) -> str:
    return "lr_" + digest(message_key, str(index))


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LabResults(Feature):
    outbox_collections = (LAB_RESULTS,)

    def __init__(self, components):
        super().__init__(components)
        self.results = components.store.db[LAB_RESULTS]
        self.cipher = components.cipher

    def ensure_indexes(self) -> None:
        ensure_indexes(self.components.store.db, INDEXES)

    def attach(self) -> None:
        self.components.message_types.register("ORU", "R01", self.handle_oru)

    def background(self):
        """Keep the staff lists and settings of agencies that received results lately loaded, so
        the first result after a quiet spell is acknowledged without waiting for directory."""
        directory, tokens = self.components.directory, self.components.service_tokens
        if tokens is None or not hasattr(directory, "keep_warm") or directory.cache_s <= 0:
            return []
        interval = max(1.0, directory.cache_s / 4)

        def run(stop) -> None:
            # The agencies of registered facilities are loaded at once: even the first result is quick.
            for facility in self.components.registrations.facilities.values():
                directory.mark_used(facility.agency_id)
            try:
                self.keep_directory_warm()
            except DomainError as exc:
                log.warning("directory cache warming failed", extra={"error_type": type(exc).__name__})
            every(stop, interval, self.keep_directory_warm, "directory cache warming", errors=(DomainError,))

        return [("lab-directory-warm", run)]

    def keep_directory_warm(self) -> int:
        directory, reloaded = self.components.directory, 0
        for agency_id in directory.recently_used(WARM_IDLE_S):
            with acting_as(self.components.service_tokens.identity(agency_id)):
                reloaded += directory.keep_warm(agency_id)
        return reloaded

    # --- the two ways in ----------------------------------------------------------------------
    def handle_oru(self, message: hl7v2.InboundMessage) -> None:
        facility = self.components.registrations.facility(message.header.receiving_facility)
        if facility is None:
            raise hl7v2.reject(hl7v2.TABLE_VALUE_NOT_FOUND, "MSH-6 receiving facility is not registered", "MSH^1^6")
        reports = reports_from_oru(
            message,
            patient_id_type=facility.patient_id_type,
            patient_id_authority=facility.patient_id_authority,
            zone=self._zone(facility.agency_id, facility.time_zone),
        )
        self.store(facility.agency_id, reports, message.message_key)

    def _zone(self, agency_id: str, facility_zone: str) -> dt.tzinfo:
        """Where unzoned HL7 times are read: the facility's registered zone, else the agency's."""
        name = facility_zone
        if not name:
            with acting_as(self.components.service_tokens.identity(agency_id)):
                name = self.components.directory.agency_settings(agency_id).time_zone
        try:
            return zoneinfo.ZoneInfo(name or "UTC")
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            return dt.UTC

    def receive_fhir(self, consumer: str, agency_id: str, body: dict) -> tuple[dict, int]:
        agency_id = self.components.registrations.partner_agency(consumer, agency_id)
        report = parse_report(body, f"fhir:{consumer}")
        ((rid, created),) = self.store(agency_id, [report], f"fhir\x1f{consumer}\x1f{agency_id}\x1f{body_digest(body)}")
        return {"id": order_id(agency_id, report), "result_id": rid, "status": report.status, "created": created}, (
            201 if created else 200
        )

    # --- storing ------------------------------------------------------------------------------
    def store(self, agency_id: str, reports: list[LabReport], message_key: str) -> list[tuple[str, bool]]:
        """Store each report with its delivery request; (result id, newly stored) for each. A repeat
        of a stored message changes nothing."""
        with acting_as(self.components.service_tokens.identity(agency_id)):
            flagged = self.components.directory.lab_recipients(agency_id)
            ordering = self._ordering_providers(agency_id, reports)
        stored = []
        for index, report in enumerate(reports):
            rid = result_id(message_key, index)
            oid = order_id(agency_id, report)
            recipients = list(dict.fromkeys([*flagged, *ordering.get(index, [])]))
            received = now_ms()
            doc = {
                "_id": rid,
                "agency_id": agency_id,
                "order_id": oid,
                "version": report.version,
                "received_at": received,
                "status": report.status,
                "severity": report.severity,
                "recipient_ids": recipients,
                "report": self.cipher.seal(agency_id, rid, "report", report.to_json()),
            }
            events = (
                [delivery_requested(agency_id, self._delivery(report, oid, rid, recipients), rid)] if recipients else []
            )
            try:
                self.results.insert_one({**doc, **outbox_fields(events)})
                created = True
            except DuplicateKeyError:
                created = False
            stored.append((rid, created))
            log.info(
                "lab result stored" if created else "lab result repeated",
                extra={"agency_id": agency_id, "item_id": oid, "recipients": len(recipients)},
            )
        return stored

    def _ordering_providers(self, agency_id: str, reports: list[LabReport]) -> dict[int, list[str]]:
        """Report index -> the staff who ordered it, when the agency asks that they be told too."""
        if not any(r.ordering_providers for r in reports):
            return {}
        if not self.components.directory.agency_settings(agency_id).notify_ordering_provider_of_results:
            return {}
        return {
            index: self.components.directory.staff_ids_for_providers(list(report.ordering_providers))
            for index, report in enumerate(reports)
            if report.ordering_providers
        }

    def _delivery(self, report: LabReport, oid: str, rid: str, recipients: list[str]) -> inbox_pb2.DeliverItemRequest:
        url = f"{self.components.settings.public_url}/api/v1/lab/results/{oid}"
        return inbox_pb2.DeliverItemRequest(
            kind=inbox_pb2.DELIVERED_KIND_LAB,
            recipients=inbox_pb2.Recipients(staff_ids=recipients),
            title=board_title(report),
            summary=board_summary(report),
            patient_name=report.patient_name[:200],  # DeliverItemRequest.patient_name holds 200
            severity=SEVERITIES[report.severity],
            status=report.status,
            links=[inbox_pb2.ActionLink(label="Full result", url=url)],
            source=SOURCE,
            source_ref=oid,
            source_version=report.version,
            delivery_id=rid,
            mark_unread=True,
        )

    # --- the full view ------------------------------------------------------------------------
    def latest(self, agency_id: str, oid: str) -> dict | None:
        cursor = (
            self.results.find({"agency_id": {"$eq": agency_id}, "order_id": {"$eq": oid}}, projection={"_outbox": 0})
            .sort([("version", DESCENDING), ("received_at", DESCENDING)])
            .limit(1)
        )
        return next(iter(cursor), None)

    def may_view(self, caller: Identity, doc: dict) -> bool:
        """Staff it was delivered to, and staff of the agency flagged Lab Result Notification now."""
        if caller.staff_id in doc.get("recipient_ids", []):
            return True
        staff = self.components.directory.staff([caller.staff_id])
        return any(s.staff_id == caller.staff_id and s.active and s.lab_result_notification for s in staff)

    def view(self, caller: Identity, oid: str) -> dict:
        doc = self.latest(caller.agency_id, oid)
        if doc is None or not self.may_view(caller, doc):
            raise audit.refuse(
                self.components.store, caller, oid, resource_type=RESOURCE_TYPE, code="lab_result_not_found"
            )
        try:
            report = LabReport.from_json(self.cipher.open(caller.agency_id, doc["_id"], "report", doc["report"]))
        except DecryptionError as exc:
            raise Unavailable("unreadable", "the result cannot be opened") from exc
        reference = audit.lab_patient_ref(
            self.components.registrations,
            self.components.settings.patient_ref_keys.current,
            caller.agency_id,
            report.patient_ref,
        )
        audit.record_patient_read(
            self.components.store,
            caller,
            oid,
            resource_type=RESOURCE_TYPE,
            reference=reference,
            reference_system=audit.patient_system(self.components.registrations, caller.agency_id),
        )
        return {
            "id": oid,
            "result_id": doc["_id"],
            "status": doc["status"],
            "severity": doc["severity"],
            "received_at": iso(doc["received_at"]),
            "patient_ref": report.patient_ref,
            "order_number": report.order_number,
            "test": {"code": report.test_code, "name": report.test_name},
            "observed_at": report.observed_at,
            "observations": [
                {
                    "code": o.code,
                    "name": o.name,
                    "value": o.value,
                    "units": o.units,
                    "reference_range": o.reference_range,
                    "flags": list(o.flags),
                    "status": o.status,
                    "severity": o.severity,
                    "comments": list(o.comments),
                    "retracted": o.retracted,
                    "absent_reason": o.absent_reason,
                }
                for o in report.observations
            ],
            "comments": list(report.comments),
            "retracted": report.retracted,
            "patient_name": report.patient_name,
        }

    # --- HTTP -----------------------------------------------------------------------------------
    def blueprints(self) -> list:
        staff = Blueprint("lab", __name__, url_prefix="/api/v1/lab")

        @staff.get("/results/<result>")
        @staff_only
        def view(result: str):
            return self.view(g.identity, path_id(result, "lab result"))

        partner = Blueprint("lab_partner", __name__, url_prefix="/api/v1/partner/lab")
        answer_errors_in_fhir(partner)

        @partner.post("/<agency_id>/DiagnosticReport")
        def diagnostic_report(agency_id: str):
            consumer = gateway_consumer()
            return self.receive_fhir(consumer, agency_id, json_body(max_depth=MAX_DEPTH))

        return [staff, partner]
