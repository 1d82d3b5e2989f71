"""erx-bridge HTTP edge (through the gateway at /api/v1/erx, staff access token required).

Routes:
- GET  /healthz, /readyz                      process and database (service port only)
- POST /api/v1/erx/sync                       start a sync: mine, or {"scope": "agency"} (admins); 202
- GET  /api/v1/erx/sync/<sync id>             its progress (my syncs; admins: the agency's)
- POST /api/v1/erx/sso                        a single sign-on address into the vendor's portal, for me
- POST /api/v1/erx/sso/patient/<item id>      the same for the patient of one of my items (the
                                              board item's "Open in ePrescribing" link; GET is 405)
- GET  /api/v1/erx/reports/pending-rx         the Pending Rx report (JSON, or ?format=csv); audited

Every answer is about the caller's agency only. ePrescribing is required: a staff member's own
routes need their ePrescribing (directory's `eprescribing_enabled`, true only while the agency
subscribes; cached `ERX_STAFF_CACHE_S`), agency-wide ones (`scope=agency`) an admin of an agency
that subscribes. Otherwise 403 `erx_not_enabled`.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re

from flask import Blueprint, Flask, Response, current_app, g, request

from services.erx_bridge import audit, domain
from services.erx_bridge.directory_client import AgencyErx, Prescriber
from services.erx_bridge.runner import SCOPE_AGENCY, SCOPE_SELF, SetupError
from services.erx_bridge.vendors.base import SSO_CONTEXTS, SSO_PATIENT, VendorError
from services.kit.crypto import DecryptionError
from services.kit.errors import Conflict, Forbidden, InvalidInput, NotFound, Unavailable
from services.kit.http import create_app as create_flask_app
from services.kit.http import error_response, readiness
from services.kit.http import require_staff as staff_only
from services.kit.mongo import now_ms
from services.kit.validation import Bool, Choice, Id, Str, json_body, path_id, validate

# A vendor's patient id: what DoseSpot and similar vendors use (digits, letters, - _ .).
PATIENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SYNC_BODY = {"scope": Choice(choices=(SCOPE_SELF, SCOPE_AGENCY)), "full": Bool()}
SSO_BODY = {
    "context": Choice(choices=SSO_CONTEXTS, required=True),
    "patient_id": Str(max_len=64, pattern=PATIENT_ID, required=False),
    "item_id": Id(required=False),
}
SETUP_ANSWERS = {
    "erx_not_subscribed": lambda: Forbidden("erx_not_enabled", "your agency does not subscribe to ePrescribing"),
    "erx_not_configured": lambda: Unavailable("erx_not_configured", "ePrescribing is not set up for your agency yet"),
    "practice_mismatch": lambda: Unavailable("erx_not_configured", "ePrescribing is not set up for your agency yet"),
}

health = Blueprint("health", __name__)
erx = Blueprint("erx", __name__, url_prefix="/api/v1/erx")


def bridge():
    """The assembled service (service.ErxBridge)."""
    return current_app.extensions["erx"]


@health.get("/readyz")
def readyz():
    return readiness({"database": lambda: bridge().store.db.command("ping")})


# --- who may -----------------------------------------------------------------------------------
def own_prescriber() -> Prescriber:
    """The caller, when they have ePrescribing; 403 erx_not_enabled otherwise."""
    caller = g.identity
    member = bridge().directory.member(caller.agency_id, caller.staff_id)
    if member is None or not member.eprescribing_enabled:
        raise Forbidden("erx_not_enabled", "ePrescribing is not enabled for you")
    return member


def agency_admin() -> AgencyErx:
    """The caller's agency, when the caller is its admin and it subscribes to ePrescribing."""
    caller = g.identity
    if not caller.is_admin:
        raise Forbidden("admin_only", "only agency admins may act for the whole agency")
    agency = bridge().directory.agency(caller.agency_id)
    if not agency.subscribed:
        raise Forbidden("erx_not_enabled", "your agency does not subscribe to ePrescribing")
    return agency


def checked_target(agency_id: str):
    """The agency's practice and adapter, or the answer saying why there is none."""
    try:
        return bridge().runner.target(agency_id)
    except SetupError as exc:
        raise SETUP_ANSWERS.get(exc.error.code, SETUP_ANSWERS["erx_not_configured"])() from None


def needs_clinician(member: Prescriber) -> str:
    if not member.clinician_id:
        raise Conflict("erx_clinician_id_missing", "no ePrescribing clinician id is recorded for you in the directory")
    return member.clinician_id


def optional_body(specs: dict) -> dict:
    """A JSON object body validated against `specs`; no body at all is an empty object."""
    if not request.get_data(cache=True):
        return validate({}, specs)
    return validate(json_body(), specs)


# --- sync --------------------------------------------------------------------------------------
@erx.post("/sync")
@staff_only
def start_sync():
    body = optional_body(SYNC_BODY)
    caller = g.identity
    scope = body.get("scope", SCOPE_SELF)
    prescriber = None
    if scope == SCOPE_AGENCY:
        agency_admin()
    else:
        prescriber = own_prescriber()
        needs_clinician(prescriber)
    checked_target(caller.agency_id)
    sync_id, _created = bridge().runner.start(
        caller.agency_id, requested_by=caller.staff_id, scope=scope, prescriber=prescriber, full=body.get("full", False)
    )
    doc = bridge().store.sync(sync_id) or {"_id": sync_id, "status": "running"}
    return {"sync_id": sync_id, "status": doc["status"]}, 202


@erx.get("/sync/<sync_id>")
@staff_only
def sync_progress(sync_id: str):
    caller = g.identity
    path_id(sync_id, "sync")
    admin = caller.is_admin and bridge().directory.agency(caller.agency_id).subscribed
    if not admin:
        own_prescriber()
    doc = bridge().store.sync(sync_id)
    mine = doc is not None and (admin or doc.get("requested_by") == caller.staff_id)
    if doc is None or doc.get("agency_id") != caller.agency_id or not mine:
        raise NotFound("sync_not_found", "no such sync")
    return bridge().runner.progress(doc)


# --- single sign-on ----------------------------------------------------------------------------
@erx.post("/sso")
@staff_only
def sso():
    body = validate(json_body(), SSO_BODY)
    context = body["context"]
    patient_id, item_id = body.get("patient_id"), body.get("item_id")
    if context == SSO_PATIENT and bool(patient_id) == bool(item_id):
        raise InvalidInput("invalid_value", "context patient needs exactly one of patient_id and item_id")
    if context != SSO_PATIENT and (patient_id or item_id):
        raise InvalidInput("invalid_value", f"context {context} takes no patient_id or item_id")
    return single_sign_on(context, patient_id=patient_id or "", item_id=item_id or "")


@erx.post("/sso/patient/<item_id>")
@staff_only
def sso_to_item(item_id: str):
    return single_sign_on(SSO_PATIENT, item_id=path_id(item_id, "eRx item"))


@erx.get("/sso/patient/<item_id>")
def sso_link_followed(item_id: str):  # noqa: ARG001 - only the method is wrong
    response = error_response(
        405, "method_not_allowed", "open this item from the Message Board page (it signs you in with POST)"
    )
    response.headers["Allow"] = "POST"
    return response


def single_sign_on(context: str, *, patient_id: str = "", item_id: str = ""):
    caller = g.identity
    member = own_prescriber()
    clinician_id = needs_clinician(member)
    target = checked_target(caller.agency_id)
    if item_id:
        patient_id = item_patient(item_id)
    try:
        link = target.adapter.sso(target.practice, clinician_id, context, patient_id)
    except VendorError as exc:
        raise Unavailable("vendor_unavailable", "the ePrescribing vendor cannot be reached; try again") from exc
    if context == SSO_PATIENT:
        ref = audit.patient_ref(patient_ref_key(), caller.agency_id, target.practice.vendor, patient_id)
        resource = item_id or ref
        audit.record(
            bridge().store,
            caller,
            [resource],
            action="sso",
            resource_type="erx_item" if item_id else "erx_patient",
            patients={resource: ref},
            vendor=target.practice.vendor,
        )
    body = {"url": link.url, "expires_at": iso(link.expires_at)}
    response = current_app.json.response(body)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


def patient_ref_key() -> str:
    """The key audit records name patients with (services.kit.patient_ref), read at start."""
    return bridge().settings.patient_ref_keys.current


def practice_vendor(agency: AgencyErx) -> str:
    """The vendor whose patient ids the agency's items carry: its configured practice's, else directory's."""
    practice = bridge().settings.practices.get(agency.agency_id)
    return practice.vendor if practice else agency.vendor


def item_patient(item_id: str) -> str:
    """The vendor's patient id of one of the caller's items (404 for anyone else's, recorded)."""
    caller = g.identity
    doc = bridge().store.item(item_id) if domain.ITEM_ID.fullmatch(item_id) else None
    if doc is None or doc.get("agency_id") != caller.agency_id or doc.get("staff_id") != caller.staff_id:
        audit.record(bridge().store, caller, [item_id], action="sso", outcome="denied")
        raise NotFound("erx_item_not_found", "no such eRx item")
    content = open_content(doc)
    if not content.get("patient_id"):
        raise Conflict("erx_patient_unknown", "the vendor named no patient for this item")
    return content["patient_id"]


# --- the Pending Rx report ---------------------------------------------------------------------
@erx.get("/reports/pending-rx")
@staff_only
def pending_rx():
    caller = g.identity
    scope = query_choice("scope", (SCOPE_SELF, SCOPE_AGENCY), SCOPE_SELF)
    form = query_choice("format", ("json", "csv"), "json")
    store, limit = bridge().store, bridge().settings.report_max_rows
    if scope == SCOPE_AGENCY:
        agency = agency_admin()
        docs = [
            d
            for kind in domain.REPORT_KINDS
            for d in store.agency_open_items(domain.agency_open_key(agency.agency_id, kind), limit + 1)
        ]
        names = {p.staff_id: p.display_name for p in bridge().directory.prescribers(caller.agency_id)}
    else:
        member = own_prescriber()
        agency = bridge().directory.agency(caller.agency_id)
        docs = [
            d
            for kind in domain.REPORT_KINDS
            for d in store.open_items(domain.open_key(caller.agency_id, caller.staff_id, kind))
        ]
        names = {member.staff_id: member.display_name}
    opened = {doc["_id"]: open_content(doc) for doc in docs if doc.get("agency_id") == caller.agency_id}
    rows = [report_row(doc, agency, names, opened[doc["_id"]]) for doc in docs if doc["_id"] in opened]
    rows.sort(key=lambda r: (r["requested_at"] or "9999", r["item_id"]))
    truncated = len(rows) > limit
    rows = rows[:limit]
    if rows:
        patients = {r["item_id"]: opened[r["item_id"]].get("patient_id", "") for r in rows}
        vendor = practice_vendor(agency)
        refs = audit.patient_refs(patient_ref_key(), caller.agency_id, vendor, patients)
        audit.record(store, caller, [r["item_id"] for r in rows], action="report", patients=refs, vendor=vendor)
    if form == "csv":
        return csv_answer(rows, agency)
    return {
        "report": "pending-rx",
        "scope": scope,
        "kinds": list(domain.REPORT_KINDS),
        "generated_at": iso_ms(now_ms()),
        "count": len(rows),
        "truncated": truncated,
        "items": rows,
    }


def report_row(doc: dict, agency: AgencyErx, names: dict[str, str], content: dict | None = None) -> dict:
    """One row of the report; `content` is the item's opened content when the caller has it."""
    content = open_content(doc) if content is None else content
    return {
        "item_id": doc["_id"],
        "kind": doc["kind"],
        "type": domain.REPORT_TYPE_NAMES.get(doc["kind"], doc["kind"]),
        "prescriber_id": doc.get("staff_id", ""),
        "prescriber_name": names.get(doc.get("staff_id", ""), ""),
        "patient_name": content.get("patient_name", ""),
        "medication": content.get("medication", ""),
        "pharmacy": content.get("pharmacy", ""),
        "requested_at": content.get("requested_at", ""),
        "date": domain.local_time(content.get("requested_at", ""), agency.time_zone),
        "detail": content.get("detail", ""),
        "first_seen_at": iso_ms(doc.get("first_seen_at") or 0),
    }


def csv_answer(rows: list[dict], agency: AgencyErx) -> Response:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(domain.report_header(agency.patient_word))
    for row in rows:
        writer.writerow([domain.csv_safe(cell) for cell in domain.report_row(row)])
    day = dt.datetime.now(dt.UTC).date().isoformat()
    return Response(
        out.getvalue(),
        content_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="pending-rx-{day}.csv"', "Cache-Control": "no-store"},
    )


# --- helpers -----------------------------------------------------------------------------------
def open_content(doc: dict) -> dict:
    try:
        return json.loads(bridge().cipher.open(doc["agency_id"], doc["_id"], "item", doc["item"]))
    except DecryptionError as exc:
        raise Unavailable("unreadable", "an eRx item cannot be opened") from exc


def query_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    value = request.args.get(name)
    if value is None:
        return default
    if value not in choices:
        raise InvalidInput("invalid_query", f"{name} must be one of: {', '.join(choices)}", {"field": name})
    return value


def iso(moment: dt.datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def iso_ms(ms: int) -> str | None:
    if not ms:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def create_app(erx_bridge, verifier) -> Flask:
    """The Flask app: kit error handling and /healthz, /readyz, the eRx routes."""
    app = create_flask_app("erx-bridge", verifier, max_body_bytes=erx_bridge.settings.max_request_bytes)
    app.extensions["erx"] = erx_bridge
    app.register_blueprint(health)
    app.register_blueprint(erx)
    return app
