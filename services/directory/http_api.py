"""HTTP edge of the directory: sign-in, signing keys, the staff directory and its administration.

Every /api/v1/directory route needs a staff access token and answers only
about the caller's agency; another agency's ids are answered like unknown ones
(404). Changes need the admin role, checked against the token and again
against the stored record, so a demoted or deactivated admin loses the right
at once rather than when the token expires.

Trust boundary for /api/v1/partner/*: partner systems do not hold staff tokens.
They come through the gateway, whose key-auth plugin authenticates the API key
and whose acl plugin checks the partner's group; Kong then replaces any
client-sent X-Consumer-* / X-Credential-Identifier headers with the
authenticated consumer's. This service trusts those headers only because its
HTTP port is reachable from the gateway alone (bound to the internal network,
never published); a route exposed without key-auth would make them forgeable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, current_app, g, jsonify, request

from services.directory import domain
from services.directory.domain import Agency, PortalPatient, StaffMember, Team, Terminology
from services.directory.sessions import Grant, TooManyAttempts
from services.kit.auth import Identity
from services.kit.errors import Conflict, Forbidden, InvalidInput, NotFound
from services.kit.http import create_app, error_response, require_auth
from services.kit.validation import Bool, Id, ListOf, Spec, Str, json_body, path_id, query_int, validate

if TYPE_CHECKING:
    from services.directory.service import Directory

PATIENT_CURSOR = re.compile(r"^\d{15}\.[A-Za-z0-9_-]{1,64}$")


@dataclass
class Fields(Spec):
    """A nested JSON object validated like a request body (unknown fields rejected)."""

    specs: dict[str, Spec]
    required: bool = False

    def clean(self, path: str, value: Any) -> dict:
        if not isinstance(value, dict):
            raise InvalidInput("invalid_type", f"{path} must be an object", {"field": path})
        try:
            return validate(value, self.specs)
        except InvalidInput as exc:
            inner = exc.details.get("field")
            details = {**exc.details, "field": f"{path}.{inner}"} if inner else exc.details
            raise InvalidInput(exc.code, f"{path}: {exc.message}", details) from exc


LOGIN = {"username": Str(max_len=254), "password": Str(max_len=1024, strip=False)}
REFRESH = {"refresh_token": Str(max_len=512)}
ROLE_LIST = ListOf(item=Str(max_len=40), max_items=10, required=False)
NEW_STAFF = {
    "username": Str(max_len=64),
    "display_name": Str(max_len=120),
    "email": Str(max_len=254, min_len=0, required=False),
    "password": Str(max_len=1024, strip=False),
    "roles": ROLE_LIST,
    "lab_result_notification": Bool(),
    "eprescribing_enabled": Bool(),
    "active": Bool(),
}
STAFF_CHANGES = {
    "display_name": Str(max_len=120, required=False),
    "email": Str(max_len=254, min_len=0, required=False),
    "password": Str(max_len=1024, strip=False, required=False),
    "roles": ROLE_LIST,
    "lab_result_notification": Bool(),
    "eprescribing_enabled": Bool(),
    "active": Bool(),
}
MEMBER_IDS = ListOf(item=Id(), max_items=domain.MAX_IDS_PER_CALL, required=False)
NEW_TEAM = {"name": Str(max_len=100), "member_ids": MEMBER_IDS}
TEAM_CHANGES = {"name": Str(max_len=100, required=False), "member_ids": MEMBER_IDS}
AGENCY_CHANGES = {
    "name": Str(max_len=120, required=False),
    "time_zone": Str(max_len=64, required=False),
    "options": Fields({"notify_linked_staff_on_schedule_change": Bool()}),
    "terminology": Fields(
        {"patient_singular": Str(max_len=40, required=False), "patient_plural": Str(max_len=40, required=False)}
    ),
}
NEW_PATIENT = {"portal_user_id": Id(), "display_name": Str(max_len=200)}

auth = Blueprint("auth", __name__, url_prefix="/api/v1/auth")
directory = Blueprint("directory", __name__, url_prefix="/api/v1/directory")
partner = Blueprint("partner", __name__, url_prefix="/api/v1/partner")


def create_directory_app(components: Directory) -> Flask:
    app = create_app("directory", components.verifier)
    app.extensions["directory"] = components
    app.register_blueprint(auth)
    app.register_blueprint(directory)
    app.register_blueprint(partner)
    app.add_url_rule("/.well-known/jwks.json", "well_known_jwks", jwks, methods=["GET"])

    @app.errorhandler(TooManyAttempts)
    def _too_many_attempts(exc: TooManyAttempts):
        response = error_response(429, exc.code, exc.message)
        response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    return app


def _components() -> Directory:
    return current_app.extensions["directory"]


# --- views of the domain ---------------------------------------------------------------------


def staff_view(member: StaffMember) -> dict:
    return {
        "id": member.id,
        "agency_id": member.agency_id,
        "display_name": member.display_name,
        "email": member.email,
        "roles": list(member.roles),
        "lab_result_notification": member.lab_result_notification,
        "eprescribing_enabled": member.eprescribing_enabled,
        "active": member.active,
    }


def staff_detail_view(member: StaffMember, team_ids: list[str]) -> dict:
    return {**staff_view(member), "username": member.username, "team_ids": team_ids}


def team_view(team: Team) -> dict:
    return {"id": team.id, "name": team.name, "member_ids": list(team.member_ids)}


def agency_view(agency: Agency) -> dict:
    return {
        "id": agency.id,
        "name": agency.name,
        "time_zone": agency.time_zone,
        "options": {"notify_linked_staff_on_schedule_change": agency.notify_linked_staff_on_schedule_change},
        "terminology": {
            "patient_singular": agency.terminology.patient_singular,
            "patient_plural": agency.terminology.patient_plural,
        },
    }


def patient_view(patient: PortalPatient) -> dict:
    return {
        "id": patient.id,
        "portal_user_id": patient.portal_user_id,
        "display_name": patient.display_name,
        "created_at": patient.created_at,
    }


def grant_view(grant: Grant) -> dict:
    member = grant.staff
    return {
        "access_token": grant.access.token,
        "token_type": "Bearer",
        "expires_in": grant.access.expires_in,
        "refresh_token": grant.refresh_token,
        "staff": {
            "id": member.id,
            "agency_id": member.agency_id,
            "display_name": member.display_name,
            "roles": list(member.roles),
        },
    }


# --- who is calling --------------------------------------------------------------------------


def staff_caller() -> Identity:
    identity: Identity = g.identity
    if identity.kind != "staff":
        raise Forbidden("forbidden", "this endpoint is for staff")
    return identity


def admin_caller() -> StaffMember:
    identity = staff_caller()
    if identity.is_admin:
        member = _components().store.get_staff(identity.agency_id, identity.subject)
        if member is not None and member.active and member.is_admin:
            return member
    raise Forbidden("forbidden", "this action needs the admin role")


# --- sign-in ---------------------------------------------------------------------------------


@auth.post("/token")
def sign_in():
    body = validate(json_body(), LOGIN)
    grant = _components().sessions.login(body["username"], body["password"])
    return grant_view(grant)


@auth.post("/refresh")
def refresh():
    body = validate(json_body(), REFRESH)
    return grant_view(_components().sessions.refresh(body["refresh_token"]))


@auth.post("/logout")
def sign_out():
    body = validate(json_body(), REFRESH)
    _components().sessions.logout(body["refresh_token"])
    return "", 204


@auth.get("/jwks")
def jwks():
    return jsonify(_components().settings.signing_keys.jwks())


# --- the directory, for any staff member ------------------------------------------------------


@directory.get("/me")
@require_auth
def me():
    identity = staff_caller()
    store = _components().store
    member = store.get_staff(identity.agency_id, identity.subject)
    if member is None:
        raise NotFound("not_found", "no such staff member")
    team_ids = domain.team_ids_by_member(store.list_teams(identity.agency_id)).get(member.id, [])
    return staff_detail_view(member, team_ids)


@directory.get("/staff")
@require_auth
def list_staff():
    identity = staff_caller()
    return {"staff": [staff_view(member) for member in _components().store.list_staff(identity.agency_id)]}


@directory.get("/staff/<staff_id>")
@require_auth
def get_staff(staff_id: str):
    identity = staff_caller()
    member = _existing_staff(identity.agency_id, staff_id)
    return staff_view(member)


@directory.get("/teams")
@require_auth
def list_teams():
    identity = staff_caller()
    return {"teams": [team_view(team) for team in _components().store.list_teams(identity.agency_id)]}


@directory.get("/teams/<team_id>")
@require_auth
def get_team(team_id: str):
    identity = staff_caller()
    return team_view(_existing_team(identity.agency_id, team_id))


@directory.get("/agency")
@require_auth
def get_agency():
    identity = staff_caller()
    return agency_view(_existing_agency(identity.agency_id))


# --- administration --------------------------------------------------------------------------


@directory.post("/staff")
@require_auth
def create_staff():
    admin = admin_caller()
    body = validate(json_body(), NEW_STAFF)
    username = domain.check_new_username(body["username"])
    password = domain.check_password(body["password"], username)
    member = StaffMember(
        id=domain.new_id(domain.STAFF_PREFIX),
        agency_id=admin.agency_id,
        username=username,
        display_name=body["display_name"],
        email=domain.check_email(body.get("email", "")),
        roles=domain.normalize_roles(body.get("roles", [])),
        lab_result_notification=body.get("lab_result_notification", False),
        eprescribing_enabled=body.get("eprescribing_enabled", False),
        active=body.get("active", True),
    )
    components = _components()
    components.store.create_staff(member, components.hasher.hash(password))
    response = jsonify(staff_detail_view(member, []))
    response.status_code = 201
    response.headers["Location"] = f"/api/v1/directory/staff/{member.id}"
    return response


@directory.patch("/staff/<staff_id>")
@require_auth
def update_staff(staff_id: str):
    admin = admin_caller()
    body = validate(json_body(), STAFF_CHANGES)
    store = _components().store
    member = _existing_staff(admin.agency_id, staff_id)
    changes: dict[str, Any] = {
        name: body[name]
        for name in ("display_name", "lab_result_notification", "eprescribing_enabled", "active")
        if name in body
    }
    if "email" in body:
        changes["email"] = domain.check_email(body["email"])
    if "roles" in body:
        changes["roles"] = domain.normalize_roles(body["roles"])
    updated = replace(member, **changes)
    if member.is_admin and member.active and not (updated.is_admin and updated.active):
        if not domain.agency_keeps_an_admin(store.list_staff(admin.agency_id), updated):
            raise Conflict("last_admin", "the agency must keep at least one active admin")
    password_hash = None
    if "password" in body:
        password_hash = _components().hasher.hash(domain.check_password(body["password"], member.username))
    store.save_staff(updated, password_hash)
    if password_hash is not None or (member.active and not updated.active):
        reason = "password_reset" if password_hash is not None else "staff_deactivated"
        store.revoke_staff_sessions(updated.id, reason)
    team_ids = domain.team_ids_by_member(store.list_teams(admin.agency_id)).get(updated.id, [])
    return staff_detail_view(updated, team_ids)


@directory.post("/teams")
@require_auth
def create_team():
    admin = admin_caller()
    body = validate(json_body(), NEW_TEAM)
    member_ids = _known_members(admin.agency_id, body.get("member_ids", []))
    team = Team(domain.new_id(domain.TEAM_PREFIX), admin.agency_id, body["name"], member_ids)
    _components().store.create_team(team)
    response = jsonify(team_view(team))
    response.status_code = 201
    response.headers["Location"] = f"/api/v1/directory/teams/{team.id}"
    return response


@directory.patch("/teams/<team_id>")
@require_auth
def update_team(team_id: str):
    admin = admin_caller()
    body = validate(json_body(), TEAM_CHANGES)
    team = _existing_team(admin.agency_id, team_id)
    if "name" in body:
        team = replace(team, name=body["name"])
    if "member_ids" in body:
        team = replace(team, member_ids=_known_members(admin.agency_id, body["member_ids"]))
    _components().store.save_team(team)
    return team_view(team)


@directory.delete("/teams/<team_id>")
@require_auth
def delete_team(team_id: str):
    admin = admin_caller()
    if not _components().store.delete_team(admin.agency_id, path_id(team_id, "team")):
        raise NotFound("not_found", "no such team")
    return "", 204


@directory.patch("/agency")
@require_auth
def update_agency():
    admin = admin_caller()
    body = validate(json_body(), AGENCY_CHANGES)
    agency = _existing_agency(admin.agency_id)
    if "name" in body:
        agency = replace(agency, name=body["name"])
    if "time_zone" in body:
        agency = replace(agency, time_zone=domain.check_time_zone(body["time_zone"]))
    options = body.get("options", {})
    if "notify_linked_staff_on_schedule_change" in options:
        agency = replace(
            agency, notify_linked_staff_on_schedule_change=options["notify_linked_staff_on_schedule_change"]
        )
    terminology: Terminology = replace(agency.terminology, **body.get("terminology", {}))
    agency = replace(agency, terminology=terminology)
    _components().store.save_agency(agency)
    return agency_view(agency)


@directory.post("/patients")
@require_auth
def create_patient():
    admin = admin_caller()
    body = validate(json_body(), NEW_PATIENT)
    patient = PortalPatient(
        id=domain.new_id(domain.PATIENT_PREFIX),
        agency_id=admin.agency_id,
        portal_user_id=body["portal_user_id"],
        display_name=body["display_name"],
    )
    patient = _components().store.create_patient(patient)
    response = jsonify(patient_view(patient))
    response.status_code = 201
    response.headers["Location"] = f"/api/v1/directory/patients/{patient.id}"
    return response


@directory.get("/patients")
@require_auth
def list_patients():
    admin = admin_caller()
    limit = query_int("limit", 50, 1, 200)
    before = request.args.get("before") or None
    if before is not None and not PATIENT_CURSOR.fullmatch(before):
        raise InvalidInput("invalid_query", "before must be a cursor returned by an earlier page", {"field": "before"})
    patients, cursor = _components().store.list_patients(admin.agency_id, limit, before)
    return {"patients": [patient_view(p) for p in patients], "next_before": cursor or None}


@directory.get("/patients/<patient_id>")
@require_auth
def get_patient(patient_id: str):
    admin = admin_caller()
    patient = _components().store.get_patient(admin.agency_id, path_id(patient_id, "patient"))
    if patient is None:
        raise NotFound("not_found", "no such patient")
    return patient_view(patient)


# --- partner systems (authenticated by the gateway; see the module docstring) ---------------------


@partner.get("/whoami")
def whoami():
    consumer = request.headers.get("X-Consumer-Username", "").strip()
    if not consumer or request.headers.get("X-Anonymous-Consumer", "").lower() == "true":
        return error_response(401, "unauthenticated", "partner requests must come through the gateway with an API key")
    return {"consumer": consumer, "credential": request.headers.get("X-Credential-Identifier")}


# --- lookups that answer 404 or 400 ------------------------------------------------------------


def _existing_staff(agency_id: str, staff_id: str) -> StaffMember:
    member = _components().store.get_staff(agency_id, path_id(staff_id, "staff member"))
    if member is None:
        raise NotFound("not_found", "no such staff member")
    return member


def _existing_team(agency_id: str, team_id: str) -> Team:
    team = _components().store.get_team(agency_id, path_id(team_id, "team"))
    if team is None:
        raise NotFound("not_found", "no such team")
    return team


def _existing_agency(agency_id: str) -> Agency:
    agency = _components().store.get_agency(agency_id)
    if agency is None:
        raise NotFound("not_found", "no such agency")
    return agency


def _known_members(agency_id: str, member_ids: list[str]) -> tuple[str, ...]:
    found = _components().store.staff_by_ids(agency_id, member_ids)
    unknown = [staff_id for staff_id in member_ids if staff_id not in found]
    if unknown:
        raise InvalidInput("unknown_staff", "some member ids are not staff of this agency", {"staff_ids": unknown})
    return tuple(member_ids)
