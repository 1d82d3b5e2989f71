"""The lab feed on the dashboards: how many HL7 v2 messages each agency's interfaces sent over MLLP
per day, by message type and the acknowledgement code answered, and FHIR lab reports accepted or
refused. Counts only (no identifiers, no content).

Kept incrementally in `dash_lab_feed`, one document per (agency, UTC day) with flat counters
(`n`, `mllp:<TYPE_TRIGGER>:<ACK code>`, `fhir:accepted`, `fhir:refused`), moved by
- a wrapper of `MessageTypes._answer` (the one place every MLLP frame's answer is decided, with its
  header and code): the agency is the receiving facility's registration (NOTIFICATIONS_FACILITIES);
  frames of no registered facility are not counted here (the Prometheus counter has them);
- a wrapper of the lab results feature's `receive_fhir` (accepted when it answers, refused when it
  raises).
Neither wrapper changes what the wrapped call answers; a failure to count is logged and dropped.

Read by agency admins (`GET /api/v1/dashboards/lab`, staff token; others 403 `admin_required`) and
by an internal dashboard system (`GET /api/v1/partner/dashboards/lab/agencies/<agency_id>`, API key
in the gateway's `dashboards` group, for the agencies NOTIFICATIONS_DASHBOARD_CONSUMERS binds it to;
404 `agency_not_found` otherwise). `?days=7|30` (default 7).
"""

from __future__ import annotations

import datetime
import logging
import re

from flask import Blueprint, g, request

from services.kit import gateway_identity
from services.kit.errors import Forbidden, InvalidInput, NotFound
from services.kit.http import require_staff as staff_only
from services.kit.mongo import now_ms
from services.kit.validation import ID_PATTERN
from services.notifications.components import Feature
from services.notifications.lab import LabResults

log = logging.getLogger(__name__)

LAB_FEED = "dash_lab_feed"
DAY_MS = 86_400_000
WINDOWS = ("7", "30")
LAB_TYPE = "ORU_R01"
_FIELD = re.compile(r"[^A-Za-z0-9]+")


def day_of(ms: int) -> int:
    return ms // DAY_MS


def field_part(text: str) -> str:
    """A message type or code as part of a flat field name (no dots, colons or dollars)."""
    return _FIELD.sub("_", text or "").strip("_")[:24] or "unknown"


def day_point(day: int, doc: dict) -> dict:
    """One day's counts: MLLP messages by type and by ACK code, lab results (ORU^R01), FHIR reports."""
    by_type: dict[str, int] = {}
    by_code: dict[str, int] = {}
    for key, value in doc.items():
        parts = key.split(":")
        if len(parts) == 3 and parts[0] == "mllp":
            by_type[parts[1]] = by_type.get(parts[1], 0) + int(value or 0)
            by_code[parts[2]] = by_code.get(parts[2], 0) + int(value or 0)
    return {
        "date": datetime.datetime.fromtimestamp(day * DAY_MS / 1000, tz=datetime.UTC).strftime("%Y-%m-%d"),
        "mllp_messages": sum(by_type.values()),
        "lab_results": by_type.get(LAB_TYPE, 0),
        "by_type": dict(sorted(by_type.items())),
        "ack_codes": dict(sorted(by_code.items())),
        "fhir_accepted": int(doc.get("fhir:accepted", 0)),
        "fhir_refused": int(doc.get("fhir:refused", 0)),
    }


class LabFeedDashboard(Feature):
    """The lab feed's daily counts per agency, and the routes that read them."""

    def __init__(self, components):
        super().__init__(components)
        self.feed = components.store.db[LAB_FEED]
        consumers = getattr(components.settings, "dashboard_consumers", None)
        self.consumers: dict = consumers if isinstance(consumers, dict) else {}

    # --- counting ----------------------------------------------------------------------------------
    def attach(self) -> None:
        types = self.components.message_types
        answer = types._answer  # noqa: SLF001 - wrapped, not changed: every frame's answer passes here

        def answer_hook(header, code, ack, seconds):
            sent = answer(header, code, ack, seconds)
            if header is not None:
                self._quietly(self.count_mllp, header, code)
            return sent

        types._answer = answer_hook  # noqa: SLF001
        for feature in self.components.features:
            # Lab reports only: the schedule's receive_fhir (FHIR Appointments) is another feed.
            if isinstance(feature, LabResults):
                feature.receive_fhir = self._counting_fhir(feature.receive_fhir)

    def _counting_fhir(self, receive):
        def receive_hook(consumer: str, agency_id: str, body: dict):
            try:
                answer = receive(consumer, agency_id, body)
            except Exception:
                self._quietly(self.count_fhir, consumer, agency_id, "refused")
                raise
            self._quietly(self.count_fhir, consumer, agency_id, "accepted")
            return answer

        return receive_hook

    @staticmethod
    def _quietly(fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - counting never changes what the interface is answered
            log.warning("lab feed dashboard not updated", exc_info=True)

    def _inc(self, agency_id: str, field: str) -> None:
        doc_id = f"{agency_id}|{day_of(now_ms())}"
        self.feed.update_one({"_id": {"$eq": doc_id}}, {"$inc": {"n": 1, field: 1}}, upsert=True)

    def count_mllp(self, header, code: str) -> None:
        agency_id = self.components.registrations.agency_for_facility(header.receiving_facility)
        if agency_id:
            kind = field_part(f"{header.message_type}_{header.trigger}")
            self._inc(agency_id, f"mllp:{kind}:{field_part(code)}")

    def count_fhir(self, consumer: str, agency_id: str, outcome: str) -> None:
        # Only agencies the partner may send for: a refused request for any other agency is not counted.
        if ID_PATTERN.fullmatch(agency_id or "") and agency_id in self.components.registrations.partners.get(
            consumer, frozenset()
        ):
            self._inc(agency_id, f"fhir:{outcome}")

    # --- reading -----------------------------------------------------------------------------------
    def report(self, agency_id: str) -> dict:
        if set(request.args) - {"days"}:
            unknown = sorted(set(request.args) - {"days"})[0]
            raise InvalidInput("invalid_query", f"unknown query parameter: {unknown}")
        raw = request.args.get("days", "7")
        if raw not in WINDOWS:
            raise InvalidInput("invalid_query", "days must be 7 or 30", {"field": "days"})
        today = day_of(now_ms())
        span = range(today - int(raw) + 1, today + 1)
        ids = [f"{agency_id}|{day}" for day in span]
        docs = {doc["_id"]: doc for doc in self.feed.find({"_id": {"$in": ids}})}
        series = [day_point(day, docs.get(f"{agency_id}|{day}") or {}) for day in span]
        codes: dict[str, int] = {}
        for point in series:
            for code, n in point["ack_codes"].items():
                codes[code] = codes.get(code, 0) + n
        return {
            "agency_id": agency_id,
            "days": int(raw),
            "mllp_messages": sum(p["mllp_messages"] for p in series),
            "lab_results": sum(p["lab_results"] for p in series),
            "ack_codes": dict(sorted(codes.items())),
            "fhir_accepted": sum(p["fhir_accepted"] for p in series),
            "fhir_refused": sum(p["fhir_refused"] for p in series),
            "days_series": series,
        }

    def blueprints(self) -> list:
        staff = Blueprint("lab_dashboard", __name__, url_prefix="/api/v1/dashboards/lab")
        partner = Blueprint("lab_dashboard_partner", __name__, url_prefix="/api/v1/partner/dashboards/lab")

        @staff.get("")
        @staff_only
        def staff_view():
            if not g.identity.is_admin:
                raise Forbidden("admin_required", "dashboards are for agency admins")
            return self.report(g.identity.agency_id)

        @partner.get("/agencies/<agency_id>")
        def partner_view(agency_id: str):
            components = self.components
            consumer = gateway_identity.verified_partner(
                components.settings.gateway_identity_keys, db=components.store.db, service="notifications"
            ).username
            if not ID_PATTERN.fullmatch(agency_id) or agency_id not in self.consumers.get(consumer, frozenset()):
                raise NotFound("agency_not_found", "no such agency")
            return self.report(agency_id)

        return [staff, partner]
