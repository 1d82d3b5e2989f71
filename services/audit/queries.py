"""The `Queries` feature: auditors read the trail through the gateway (route `audit`, jwt).

- GET /api/v1/audit/records      a page of the caller's agency's records, newest first (json | csv)
- POST /api/v1/audit/records/search
                                 the same, for a patient named by a record number (or an eRx vendor's
                                 patient id) in the JSON body, never in the address: the trail holds
                                 keyed references (services.kit.patient_ref), so the identifier is
                                 turned into the reference of each identifier space the agency's
                                 records have used (or the one given) under every patient reference key
- GET /api/v1/audit/export       every matching record, up to AUDIT_EXPORT_MAX_ROWS, as a download
- GET /api/v1/audit/checkpoints  the agency chain's signed checkpoints, newest first
- GET /api/v1/audit/verify       the agency chain checked now (services.audit.verify; the witness file is
                                 checked by `python -m services.audit verify`, outside the request path)
- GET /api/v1/audit/keys         the public keys checkpoints are signed with (any staff member)

Who: agency admins and compliance officers (roles `admin`, `compliance_officer`); anyone else gets
403 `auditor_only`, recorded as an `access_refused` security event. Everything is scoped to the
caller's own agency chain: another agency's records, and the system chain, are never answered.
Each answer is itself recorded: a `phi.accessed.v1` of the audit service (resource_type
`audit_trail`, resource_id the agency, action `query`/`export`/`read_checkpoints`/`verify`,
patient_id the patient asked about), staged in `access_records` and chained like any other.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import replace

from flask import Blueprint, Response, current_app, g, jsonify, request

from services.audit import export, query
from services.audit.components import Components, Feature
from services.audit.config import SERVICE
from services.audit.ingest import ref_system
from services.audit.signing import public_jwk, public_pem
from services.audit.verify import overdue_after_ms, verify_chain
from services.kit.audit import access_record, phi_accessed
from services.kit.auth import ROLE_ADMIN, ROLE_COMPLIANCE_OFFICER, Identity
from services.kit.errors import Forbidden, InvalidInput
from services.kit.http import require_staff
from services.kit.mongo import now_ms
from services.kit.patient_ref import search_refs
from services.kit.validation import Str, json_body, query_int, validate

AUDITOR_ROLES = (ROLE_ADMIN, ROLE_COMPLIANCE_OFFICER)
MAX_IDENTIFIER = 100
RESOURCE_TYPE = "audit_trail"
_SEQ_CURSOR = re.compile(r"^[0-9]{1,12}$")

api = Blueprint("audit", __name__, url_prefix="/api/v1/audit")


def _components() -> Components:
    return current_app.extensions["audit"]


def auditor() -> Identity:
    """The caller, if they may read the agency's trail; else the refusal is recorded and 403."""
    caller: Identity = g.identity
    if any(caller.has_role(role) for role in AUDITOR_ROLES):
        return caller
    _components().security_log.record(
        "access_refused",
        agency_id=caller.agency_id,
        actor_id=caller.subject,
        actor_kind="staff",
        outcome="refused",
        reason="auditor_only",
        target_type=RESOURCE_TYPE,
        target_id=caller.agency_id,
    )
    raise Forbidden("auditor_only", "only agency admins and compliance officers read the audit trail")


def record_read(caller: Identity, action: str, patient_id: str = "") -> None:
    """Reading the trail leaves a record in it (through the outbox, like any other service's reads)."""
    event = phi_accessed(
        caller,
        service=SERVICE,
        resource_type=RESOURCE_TYPE,
        resource_id=caller.agency_id,
        action=action,
        patient_id=patient_id,
    )
    _components().store.record_access(access_record(caller, [event], action=action))


def _records(caller: Identity, *, default_limit: int, max_limit: int) -> tuple[query.Query, list[dict], str | None]:
    asked = query.parse(request.args.to_dict(flat=False), default_limit=default_limit, max_limit=max_limit)
    docs, next_cursor = _components().store.page(caller.agency_id, asked.filters, asked.limit, asked.cursor)
    return asked, [export.item(doc) for doc in docs], next_cursor


def _csv(items: list[dict], next_cursor: str | None, filename: str | None = None) -> Response:
    response = Response(export.csv_text(items), mimetype="text/csv")
    response.headers["Content-Type"] = "text/csv; charset=utf-8"
    if next_cursor:
        response.headers["X-Next-Cursor"] = next_cursor
    if filename:
        response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@api.get("/records")
@require_staff
def records():
    caller = auditor()
    settings = _components().settings
    asked, items, next_cursor = _records(caller, default_limit=min(50, settings.page_max), max_limit=settings.page_max)
    record_read(caller, "query", asked.filters.patient_id)
    if asked.format == "csv":
        return _csv(items, next_cursor)
    return {"items": items, "next_cursor": next_cursor}


SEARCH_FIELDS = {
    "patient_identifier": Str(max_len=MAX_IDENTIFIER),
    "identifier_system": Str(max_len=200, required=False),
    **{name: Str(max_len=200, required=False) for name in query.PARAMETERS if name != "patient_id"},
}


def patient_search_refs(chain: str, agency_id: str, identifier: str, system: str | None) -> list[str]:
    """Every reference the patient `identifier` may be recorded under in `chain`: per identifier
    space (the one given, else each the chain's records have used) and per key."""
    keys = _components().settings.patient_ref_keys
    systems = [ref_system(system)] if system is not None else _components().store.ref_systems_of(chain)
    refs: list[str] = []
    for space in (space for space in systems if space):
        refs.extend(search_refs(agency_id, space, identifier, keys))
    return list(dict.fromkeys(refs))


@api.post("/records/search")
@require_staff
def search_records():
    """Records about a patient named by an identifier that is PHI (JSON body, module docstring)."""
    caller = auditor()
    if request.args:  # an identifier in the address would end up in logs: the body only
        name = sorted(request.args)[0][:64]
        raise InvalidInput("invalid_query", f"the search takes no query parameters ({name})", {"field": name})
    body = validate(json_body(), SEARCH_FIELDS)
    identifier, system = body.pop("patient_identifier"), body.pop("identifier_system", None)
    if system is not None and not ref_system(system):
        raise InvalidInput(
            "invalid_value", "identifier_system is not an identifier space", {"field": "identifier_system"}
        )
    settings = _components().settings
    asked = query.parse(
        {name: [value] for name, value in body.items()},
        default_limit=min(50, settings.page_max),
        max_limit=settings.page_max,
    )
    refs = patient_search_refs(caller.agency_id, caller.agency_id, identifier, system)
    items: list[dict] = []
    next_cursor = None
    if refs:
        filters = replace(asked.filters, patient_ids=tuple(refs))
        docs, next_cursor = _components().store.page(caller.agency_id, filters, asked.limit, asked.cursor)
        items = [export.item(doc) for doc in docs]
    record_search(caller, refs)
    if asked.format == "csv":
        return _csv(items, next_cursor)
    return {"items": items, "next_cursor": next_cursor, "patient_refs": refs}


def record_search(caller: Identity, refs: list[str]) -> None:
    """A search by identifier is recorded against each reference it tried (one event each), or
    once with no patient when the agency's records use no identifier space yet."""
    events = [
        phi_accessed(
            caller,
            service=SERVICE,
            resource_type=RESOURCE_TYPE,
            resource_id=caller.agency_id,
            action="search",
            patient_id=ref,
        )
        for ref in refs or [""]
    ]
    _components().store.record_access(access_record(caller, events, action="search"))


@api.get("/export")
@require_staff
def export_records():
    caller = auditor()
    most = _components().settings.export_max_rows
    asked, items, next_cursor = _records(caller, default_limit=most, max_limit=most)
    record_read(caller, "export", asked.filters.patient_id)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    filename = f"audit-{caller.agency_id}-{stamp}.{asked.format}"
    if asked.format == "csv":
        return _csv(items, next_cursor, filename)
    response = jsonify(
        {
            "agency_id": caller.agency_id,
            "exported_at": export.iso(int(dt.datetime.now(dt.UTC).timestamp() * 1000)),
            "items": items,
            "next_cursor": next_cursor,
        }
    )
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@api.get("/checkpoints")
@require_staff
def checkpoints():
    caller = auditor()
    unknown = sorted(set(request.args) - {"limit", "cursor"})
    if unknown:
        raise InvalidInput("invalid_query", f"unknown query parameter: {unknown[0][:64]}", {"field": unknown[0][:64]})
    limit = query_int("limit", 50, 1, _components().settings.page_max)
    cursor = request.args.get("cursor")
    if cursor is not None and not _SEQ_CURSOR.fullmatch(cursor):
        raise InvalidInput("invalid_query", "cursor is not one this service gave", {"field": "cursor"})
    found = _components().store.checkpoint_page(caller.agency_id, limit + 1, int(cursor) if cursor else None)
    record_read(caller, "read_checkpoints")
    shown = [
        {key: cp[key] for key in ("chain", "seq", "hash", "key_id", "signature")}
        | {"at": export.iso(cp["at"]), "at_ms": cp["at"]}
        for cp in found[:limit]
    ]
    return {"items": shown, "next_cursor": str(found[limit - 1]["seq"]) if len(found) > limit else None}


@api.get("/verify")
@require_staff
def verify():
    caller = auditor()
    if request.args:
        raise InvalidInput("invalid_query", "verify takes no parameters", {"field": sorted(request.args)[0][:64]})
    components = _components()
    store, chain = components.store, caller.agency_id
    settings = components.settings
    report = verify_chain(
        chain,
        store.chain_records(chain),
        store.checkpoints_of(chain),
        settings.trusted_keys,
        now=now_ms(),
        overdue_ms=overdue_after_ms(settings.checkpoint_interval_s),
    )
    record_read(caller, "verify")
    return report.as_dict()


@api.get("/keys")
@require_staff
def keys():
    """Public keys: the active one first. Pin them out of band before trusting them (docs/audit.md)."""
    settings = _components().settings
    active = settings.signing_key.key_id if settings.signing_key else None
    listed = sorted(settings.trusted_keys.keys.items(), key=lambda item: item[0] != active)
    return {
        "active_key_id": active,
        "keys": [public_jwk(key) | {"pem": public_pem(key)} for _, key in listed],
    }


class Queries(Feature):
    def blueprint(self):
        return api
