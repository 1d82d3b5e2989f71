"""Triage's HTTP shapes: the request bodies it accepts (strictly: unknown fields, wrong types and
operator objects are 400 before any database access) and the views it answers with.

    GET  /api/v1/cloud/triage/<document id>          the triage view (below)
    POST /api/v1/cloud/triage/<document id>/confirm  {"patient_id": id | null, "document_type": type}
    GET  /api/v1/cloud/patients?q=<MRN or name>      {"patients": [{"id", "name", "birth_date", "mrn"}]}
    POST /api/v1/cloud/patients                      {"patients": [{"mrn", "family", "given", "birth_date"}]}
    GET|PUT /api/v1/cloud/triage/settings            {"routes": {type: team id}, "auto_file_confidence",
                                                      "mrn_assigning_authorities": [OID]}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from services.cloud_comms.direct.views import iso
from services.cloud_comms.triage.classify import DOCUMENT_TYPES, OTHER
from services.cloud_comms.triage.records import AgencySettings
from services.cloud_comms.triage.roster import Patient, valid_birth_date
from services.cloud_comms.triage.settings import MIN_AUTO_FILE_CONFIDENCE
from services.kit import audit as kit_audit
from services.kit.auth import Identity
from services.kit.errors import InvalidInput, NotFound
from services.kit.mongo import now_ms
from services.kit.validation import ID_PATTERN, Choice, Fields, Id, ListOf, Spec, Str, json_body, validate

PRODUCER = "cloud-comms"
MAX_IMPORT = 1000
MAX_QUERY = 100
QUERY = re.compile(r"[\w .,'#/-]+")
MRN = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._/-]*")
SHOWN_CANDIDATES = 3
OID = re.compile(r"[0-2](?:\.(?:0|[1-9][0-9]*))+")
MAX_AUTHORITIES = 20


def body() -> dict:
    return json_body()


def document_id(value: str) -> str:
    """A path's document id; a malformed one cannot exist (404 like an unknown one)."""
    if not ID_PATTERN.fullmatch(value):
        raise NotFound("document_not_found", "no such document")
    return value


@dataclass
class Confidence(Spec):
    """A number within [minimum, 1]; true/false are not numbers here."""

    minimum: float = MIN_AUTO_FILE_CONFIDENCE
    required: bool = False

    def clean(self, path: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInput("invalid_type", f"{path} must be a number", {"field": path})
        if not self.minimum <= value <= 1.0:
            raise InvalidInput("out_of_range", f"{path} must be between {self.minimum} and 1", {"field": path})
        return float(value)


@dataclass
class Routes(Spec):
    """{document type: team id or null}; null (or leaving a type out) routes nothing."""

    required: bool = False

    def clean(self, path: str, value: Any) -> dict[str, str]:
        if not isinstance(value, dict):
            raise InvalidInput("invalid_type", f"{path} must be an object", {"field": path})
        routes = {}
        for kind, team in value.items():
            if kind not in DOCUMENT_TYPES:
                raise InvalidInput(
                    "invalid_value", f"{path}: document types are {', '.join(DOCUMENT_TYPES)}", {"field": path}
                )
            if team is not None:
                routes[kind] = Id().clean(f"{path}.{kind}", team)
        return routes


CONFIRMATION = {"patient_id": Id(required=False), "document_type": Choice(DOCUMENT_TYPES, required=True)}
SETTINGS = {
    "routes": Routes(),
    "auto_file_confidence": Confidence(),
    "mrn_assigning_authorities": ListOf(Str(max_len=64, pattern=OID), max_items=MAX_AUTHORITIES),
}
PATIENT = {
    "mrn": Str(max_len=32, pattern=MRN),
    "family": Str(max_len=100),
    "given": Str(max_len=100),
    "birth_date": Str(max_len=10),
}
IMPORT = {"patients": ListOf(Fields(PATIENT, required=True), max_items=MAX_IMPORT, required=True, unique=False)}


def confirmation(payload: dict) -> dict:
    return validate(payload, CONFIRMATION)


def settings_change(payload: dict, current: AgencySettings) -> AgencySettings:
    """The settings after a PUT: each field given replaces the current one."""
    cleaned = validate(payload, SETTINGS)
    return AgencySettings(
        routes=cleaned.get("routes", current.routes),
        auto_file_confidence=cleaned.get("auto_file_confidence", current.auto_file_confidence),
        mrn_assigning_authorities=tuple(cleaned.get("mrn_assigning_authorities", current.mrn_assigning_authorities)),
    )


def roster_import(payload: dict) -> list[dict]:
    patients = validate(payload, IMPORT)["patients"]
    if not patients:
        raise InvalidInput("invalid_value", "patients must not be empty", {"field": "patients"})
    for n, patient in enumerate(patients):
        if not valid_birth_date(patient["birth_date"]):
            raise InvalidInput(
                "invalid_birth_date",
                f"patients[{n}].birth_date must be a date YYYY-MM-DD from 1900 to today",
                {"field": f"patients[{n}].birth_date"},
            )
    return patients


def search_text(q: str) -> str:
    text = q.strip()
    if not text:
        raise InvalidInput("invalid_query", "q (an MRN or a name) is required", {"field": "q"})
    if len(text) > MAX_QUERY or not QUERY.fullmatch(text):
        raise InvalidInput("invalid_query", "q must be an MRN or a name", {"field": "q"})
    return text


def record_search(store, caller: Identity, patient_ids: list[str]) -> None:
    """One access record for a roster search: an event for the search and one per patient shown
    (naming them as `patient_id`)."""
    search = kit_audit.phi_accessed(
        caller, service=PRODUCER, resource_type="patient", resource_id="patients", action="search"
    )
    events = [search]
    events += [
        kit_audit.phi_accessed(
            caller, service=PRODUCER, resource_type="patient", resource_id=rid, action="search", patient_id=rid
        )
        for rid in patient_ids
    ]
    store.record_access(kit_audit.access_record(caller, events, resource_id="patients", action="search"))


# --- the triage record -------------------------------------------------------------------------------
def no_suggestion(reason: str) -> dict:
    return {
        "patient_id": None,
        "confidence": 0.0,
        "matched_on": [],
        "document_type": OTHER,
        "document_type_confidence": 0.0,
        "candidates": [],
        "read_from": "none",
        "reason": reason,
        "reasons": [],
        "multiple_patients": False,
    }


def history_entry(action: str, by: dict | None, patient_id: str | None, document_type: str, **extra) -> dict:
    return {
        "at": now_ms(),
        "action": action,
        "by": by,
        "patient_id": patient_id,
        "document_type": document_type,
        **extra,
    }


def patient_ids(record: dict | None, suggestion: dict | None) -> list[str]:
    """Every patient a view shows: the suggested one, the candidates, the confirmed one."""
    ids = [c["id"] for c in (suggestion or {}).get("candidates", [])]
    ids += [(suggestion or {}).get("patient_id"), ((record or {}).get("confirmed") or {}).get("patient_id")]
    return [i for i in dict.fromkeys(ids) if i]


def _patient(patients: dict[str, Patient], pid: str | None) -> dict | None:
    return patients[pid].view() if pid in patients else None


def state(record: dict | None) -> str:
    if record and record.get("confirmed_at"):
        return "confirmed"
    if record and record.get("suggested_at"):
        return record.get("outcome", "no_match")
    return "pending"


def view(kind: str, doc_id: str, record: dict | None, suggestion: dict | None, patients: dict[str, Patient]) -> dict:
    record = record or {}
    confirmed = record.get("confirmed")
    routed = record.get("routed")
    return {
        "document_id": doc_id,
        "kind": kind,
        "state": state(record),
        "suggestion": None
        if suggestion is None
        else {
            "patient": _patient(patients, suggestion["patient_id"]),
            "confidence": suggestion["confidence"],
            "matched_on": suggestion["matched_on"],
            "document_type": suggestion["document_type"],
            "document_type_confidence": suggestion["document_type_confidence"],
            "multiple_patients": suggestion.get("multiple_patients", False),
            "reasons": suggestion.get("reasons", []),
        },
        "candidates": [
            {**patients[c["id"]].view(), "confidence": c["confidence"], "matched_on": c["matched_on"]}
            for c in (suggestion or {}).get("candidates", [])
            if c["id"] in patients
        ][:SHOWN_CANDIDATES],
        "confirmed": None
        if not confirmed
        else {
            "patient": _patient(patients, confirmed["patient_id"]),
            "document_type": confirmed["document_type"],
            "by": confirmed["by"],
            "automatic": confirmed["by"] is None,
            "at": iso(confirmed["at"]),
        },
        "routed_to": {"team_id": routed["team_id"], "team_name": routed.get("team_name", "")} if routed else None,
        "history": [{**entry, "at": iso(entry["at"])} for entry in record.get("history", [])],
    }
