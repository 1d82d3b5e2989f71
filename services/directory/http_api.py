"""HTTP edge of the directory: sign-in, signing keys, the staff directory and its administration.

Every /api/v1/directory route needs a staff access token and answers only
about the caller's agency; another agency's ids are answered like unknown ones
(404). Changes need the admin role, read from the token: the directory checks
every token's session against its store, and demoting or deactivating a member
revokes all their sessions, so a token that still names a role its holder lost
is refused (`session_revoked`) at once rather than when it expires.

Trust boundary for /api/v1/partner/*: partner systems do not hold staff tokens.
They come through the gateway, whose key-auth plugin authenticates the API key
and whose acl plugin checks the partner's group; Kong then replaces any
client-sent X-Consumer-* / X-Credential-Identifier headers with the
authenticated consumer's and signs them, per request, in X-Gateway-Identity
(the clinic-identity-signer plugin, docs/gateway-identity.md). This service
believes those headers only when that token verifies for this very request
(services.kit.gateway_identity); otherwise 401 and a forged_identity_refused
security event, whoever reaches the port.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, current_app, g, jsonify, request

from services.directory import domain
from services.directory.domain import Agency, CloudAddress, PortalPatient, StaffMember, Team, Terminology
from services.directory.sessions import Grant, TooManyAttempts
from services.kit import gateway_identity
from services.kit.auth import Identity
from services.kit.errors import Forbidden, InvalidInput, NotFound
from services.kit.http import client_address, create_app, error_response, readiness, require_auth
from services.kit.validation import Bool, Fields, Id, Int, ListOf, Str, json_body, path_id, query_int, validate

if TYPE_CHECKING:
    from services.directory.service import Directory

PASSWORD = Str(max_len=domain.PASSWORD_MAX_LENGTH, strip=False)
LOGIN = {"username": Str(max_len=254), "password": PASSWORD}
REFRESH = {"refresh_token": Str(max_len=512)}
ROLE_LIST = ListOf(item=Str(max_len=40), max_items=10, required=False)
# "" clears it; otherwise an id, checked against the agency's active staff.
SUPERVISOR = Str(max_len=64, min_len=0, required=False)
# "" clears it; otherwise checked by domain.check_npi (a longer text is still answered invalid_npi).
NPI = Str(max_len=64, min_len=0, required=False)
# "" clears them; otherwise checked by domain (a longer text is still answered invalid_erx_...).
ERX_ID = Str(max_len=200, min_len=0, required=False)
NEW_STAFF = {
    "username": Str(max_len=64),
    "display_name": Str(max_len=120),
    "email": Str(max_len=254, min_len=0, required=False),
    "password": PASSWORD,
    "roles": ROLE_LIST,
    "lab_result_notification": Bool(),
    "eprescribing_enabled": Bool(),
    "active": Bool(),
    "supervisor_id": SUPERVISOR,
    "npi": NPI,
    "erx_clinician_id": ERX_ID,
}
STAFF_CHANGES = {
    "display_name": Str(max_len=120, required=False),
    "email": Str(max_len=254, min_len=0, required=False),
    "password": replace(PASSWORD, required=False),
    "roles": ROLE_LIST,
    "lab_result_notification": Bool(),
    "eprescribing_enabled": Bool(),
    "active": Bool(),
    "supervisor_id": SUPERVISOR,
    "npi": NPI,
    "erx_clinician_id": ERX_ID,
}
MEMBER_IDS = ListOf(item=Id(), max_items=domain.MAX_IDS_PER_CALL, required=False)
NEW_TEAM = {"name": Str(max_len=100), "member_ids": MEMBER_IDS}
TEAM_CHANGES = {"name": Str(max_len=100, required=False), "member_ids": MEMBER_IDS}


AGENCY_CHANGES = {
    "name": Str(max_len=120, required=False),
    "time_zone": Str(max_len=64, required=False),
    "options": Fields(
        {
            "notify_linked_staff_on_schedule_change": Bool(),
            "portal_consumer": Str(max_len=64, min_len=0, required=False),
            "compliance_escalation_minutes": Int(
                minimum=domain.MIN_COMPLIANCE_ESCALATION_MINUTES, maximum=domain.MAX_COMPLIANCE_ESCALATION_MINUTES
            ),
            "idle_signout_minutes": Int(
                minimum=domain.IDLE_SIGNOUT_MINUTES_RANGE[0], maximum=domain.IDLE_SIGNOUT_MINUTES_RANGE[1]
            ),
            "notify_ordering_provider_of_results": Bool(),
            "erx_subscription": Bool(),
            "erx_vendor": Str(max_len=64, min_len=0, required=False),
            "erx_clinic_id": ERX_ID,
        }
    ),
    "terminology": Fields(
        {"patient_singular": Str(max_len=40, required=False), "patient_plural": Str(max_len=40, required=False)}
    ),
}
CLOUD_STAFF_IDS = ListOf(item=Id(), max_items=domain.MAX_CLOUD_ADDRESS_STAFF, required=False)
CLOUD_LABEL = Str(max_len=100, min_len=0, required=False)
NEW_CLOUD_ADDRESS = {
    "kind": Str(max_len=16),
    # Checked by domain.check_cloud_address (a longer text than any address is still invalid_address).
    "address": Str(max_len=320),
    "label": CLOUD_LABEL,
    "staff_ids": CLOUD_STAFF_IDS,
}
CLOUD_ADDRESS_CHANGES = {"label": CLOUD_LABEL, "staff_ids": CLOUD_STAFF_IDS}
NEW_PATIENT = {"portal_user_id": Id(), "display_name": Str(max_len=200)}

auth = Blueprint("auth", __name__, url_prefix="/api/v1/auth")
directory = Blueprint("directory", __name__, url_prefix="/api/v1/directory")
partner = Blueprint("partner", __name__, url_prefix="/api/v1/partner")


def create_directory_app(components: Directory) -> Flask:
    app = create_app(
        "directory",
        components.verifier,
        security_log=components.sessions.security,
        trusted_proxies=components.settings.trusted_proxies,
    )
    app.extensions["directory"] = components
    app.register_blueprint(auth)
    app.register_blueprint(directory)
    app.register_blueprint(partner)
    app.add_url_rule("/.well-known/jwks.json", "well_known_jwks", jwks, methods=["GET"])
    app.add_url_rule("/readyz", "readyz", readyz, methods=["GET"])

    @app.errorhandler(TooManyAttempts)
    def _too_many_attempts(exc: TooManyAttempts):
        response = error_response(429, exc.code, exc.message)
        response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    return app


def _components() -> Directory:
    return current_app.extensions["directory"]


# --- views of the domain ---------------------------------------------------------------------


def staff_view(member: StaffMember, agency: Agency | None, for_admin: bool = False) -> dict:
    """A staff member as the page shows them. `eprescribing_enabled` is whether they have ePrescribing
    (domain.has_eprescribing: their flag, active, and the agency subscribes); admins, who set the flag
    and the vendor's clinician id, also see both as stored (`eprescribing_flag`, `erx_clinician_id`)."""
    view = {
        "id": member.id,
        "agency_id": member.agency_id,
        "display_name": member.display_name,
        "email": member.email,
        "roles": list(member.roles),
        "lab_result_notification": member.lab_result_notification,
        "eprescribing_enabled": domain.has_eprescribing(member, agency),
        "active": member.active,
        "supervisor_id": member.supervisor_id,
        "npi": member.npi,
    }
    if for_admin:
        view["eprescribing_flag"] = member.eprescribing_enabled
        view["erx_clinician_id"] = member.erx_clinician_id
    return view


def staff_detail_view(member: StaffMember, team_ids: list[str], agency: Agency | None, for_admin: bool = False) -> dict:
    return {**staff_view(member, agency, for_admin), "username": member.username, "team_ids": team_ids}


def _staff_detail(member: StaffMember, for_admin: bool) -> dict:
    store = _components().store
    team_ids = store.team_ids_of(member.agency_id, [member.id])[member.id]
    return staff_detail_view(member, team_ids, store.get_agency(member.agency_id), for_admin)


def team_view(team: Team) -> dict:
    return {"id": team.id, "name": team.name, "member_ids": list(team.member_ids)}


def agency_view(agency: Agency, for_admin: bool = False) -> dict:
    """The agency's settings; which gateway consumer serves its patient portal and the practice's
    clinic id at the ePrescribing vendor are shown to admins only (they name partner integrations,
    which only admins configure)."""
    options: dict[str, Any] = {
        "notify_linked_staff_on_schedule_change": agency.notify_linked_staff_on_schedule_change,
        "compliance_escalation_minutes": agency.compliance_escalation_minutes,
        "idle_signout_minutes": agency.idle_signout_minutes,
        "notify_ordering_provider_of_results": agency.notify_ordering_provider_of_results,
        "erx_subscription": agency.erx_subscription,
        "erx_vendor": agency.erx_vendor,
    }
    if for_admin:
        options["portal_consumer"] = agency.portal_consumer
        options["erx_clinic_id"] = agency.erx_clinic_id
    return {
        "id": agency.id,
        "name": agency.name,
        "time_zone": agency.time_zone,
        "options": options,
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


def cloud_address_view(address: CloudAddress, staff: dict[str, StaffMember]) -> dict:
    """An address with its linked staff; `staff` holds the agency's members by id (a linked id no longer
    among them is left out of `staff` but kept in `staff_ids`)."""
    return {
        "id": address.id,
        "kind": address.kind,
        "address": address.address,
        "label": address.label,
        "staff_ids": list(address.staff_ids),
        "staff": [
            {"id": staff_id, "display_name": staff[staff_id].display_name, "active": staff[staff_id].active}
            for staff_id in address.staff_ids
            if staff_id in staff
        ],
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


def admin_caller() -> Identity:
    """A staff caller whose token holds the admin role (see the module docstring for why the token suffices)."""
    identity = staff_caller()
    if not identity.is_admin:
        raise Forbidden("forbidden", "this action needs the admin role")
    return identity


def _as(caller: Callable[[], Identity]) -> Callable[[Callable], Callable]:
    """A view decorator: verify the bearer token, check the caller, and pass the caller's Identity first."""

    def decorate(view: Callable) -> Callable:
        @require_auth
        @functools.wraps(view)
        def wrapper(*args, **kwargs):
            return view(caller(), *args, **kwargs)

        return wrapper

    return decorate


for_staff = _as(staff_caller)
for_admins = _as(admin_caller)


def _created(body: dict, location: str):
    response = jsonify(body)
    response.status_code = 201
    response.headers["Location"] = location
    return response


# --- sign-in ---------------------------------------------------------------------------------


def _client() -> str:
    """The caller's address, as a trusted hop states it (config TRUSTED_PROXIES) or as seen: the
    sign-in budget it spends and the source its security events name."""
    return client_address(_components().settings.trusted_proxies)


@auth.post("/token")
def sign_in():
    body = validate(json_body(), LOGIN)
    grant = _components().sessions.login(body["username"], body["password"], source=_client())
    return grant_view(grant)


@auth.post("/refresh")
def refresh():
    """Not activity: a refresh past the session's idle deadline is refused (`session_idle_expired`)."""
    body = validate(json_body(), REFRESH)
    return grant_view(_components().sessions.refresh(body["refresh_token"], source=_client()))


@auth.post("/logout")
def sign_out():
    body = validate(json_body(), REFRESH)
    _components().sessions.logout(body["refresh_token"], source=_client())
    return "", 204


@auth.post("/activity")
@for_staff
def activity(caller: Identity):
    """The page's report that its user is active (no body): the token's session gets a full idle
    period from now; 401 `session_idle_expired` when it was already past its deadline."""
    _components().sessions.activity(caller)
    return "", 204


@auth.get("/jwks")
def jwks():
    return jsonify(_components().settings.signing_keys.jwks())


def readyz():
    """Ready when the database answers (sign-in, tokens and every lookup need it)."""
    return readiness({"database": lambda: _components().store.db.command("ping")})


# --- the directory, for any staff member ------------------------------------------------------


@directory.get("/me")
@for_staff
def me(caller: Identity):
    return _staff_detail(_existing_staff(caller.agency_id, caller.subject), caller.is_admin)


@directory.get("/staff")
@for_staff
def list_staff(caller: Identity):
    store = _components().store
    agency = store.get_agency(caller.agency_id)
    return {"staff": [staff_view(member, agency, caller.is_admin) for member in store.list_staff(caller.agency_id)]}


@directory.get("/staff/<staff_id>")
@for_staff
def get_staff(caller: Identity, staff_id: str):
    member = _existing_staff(caller.agency_id, staff_id)
    return staff_view(member, _components().store.get_agency(caller.agency_id), caller.is_admin)


@directory.get("/teams")
@for_staff
def list_teams(caller: Identity):
    return {"teams": [team_view(team) for team in _components().store.list_teams(caller.agency_id)]}


@directory.get("/teams/<team_id>")
@for_staff
def get_team(caller: Identity, team_id: str):
    return team_view(_existing_team(caller.agency_id, team_id))


@directory.get("/agency")
@for_staff
def get_agency(caller: Identity):
    return agency_view(_existing_agency(caller.agency_id), for_admin=caller.is_admin)


# --- administration --------------------------------------------------------------------------

# The staff fields whose change matters for security: what the member may do and see (roles,
# active, supervisor, the lab flag, ePrescribing) and how they sign in (password).
SECURITY_STAFF_FIELDS = (
    "roles",
    "active",
    "password",
    "supervisor_id",
    "lab_result_notification",
    "eprescribing_enabled",
    "npi",
    "erx_clinician_id",
)


def _settings_changed(admin: Identity, target_type: str, target_id: str, fields: list[str]) -> None:
    """One `settings_changed` security event for this request: the admin, what was changed and the
    NAMES of the fields changed (`reason`, comma-joined), never their values. Nothing changed:
    nothing recorded."""
    if not fields:
        return
    _components().sessions.security.record(
        "settings_changed",
        agency_id=admin.agency_id,
        actor_id=admin.subject,
        actor_kind="staff",
        outcome="succeeded",
        reason=",".join(fields),
        target_type=target_type,
        target_id=target_id,
        source=_client(),
    )


def _changed(before: object, after: object, names: list[str], prefix: str = "") -> list[str]:
    return [f"{prefix}{name}" for name in names if getattr(before, name) != getattr(after, name)]


@directory.post("/staff")
@for_admins
def create_staff(admin: Identity):
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
        npi=domain.check_npi(body.get("npi", "")),
        erx_clinician_id=domain.check_erx_clinician_id(body.get("erx_clinician_id", "")),
    )
    member = replace(member, supervisor_id=_supervisor(member, body.get("supervisor_id", "")))
    components = _components()
    components.store.create_staff(member, components.hasher.hash(password))
    _settings_changed(admin, "staff", member.id, ["created", *(f for f in SECURITY_STAFF_FIELDS if f in body)])
    agency = components.store.get_agency(admin.agency_id)
    return _created(staff_detail_view(member, [], agency, for_admin=True), f"/api/v1/directory/staff/{member.id}")


@directory.patch("/staff/<staff_id>")
@for_admins
def update_staff(admin: Identity, staff_id: str):
    body = validate(json_body(), STAFF_CHANGES)
    components = _components()
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
    if "supervisor_id" in body:
        changes["supervisor_id"] = _supervisor(member, body["supervisor_id"])
    if "npi" in body:
        changes["npi"] = domain.check_npi(body["npi"])
    if "erx_clinician_id" in body:
        changes["erx_clinician_id"] = domain.check_erx_clinician_id(body["erx_clinician_id"])
    updated = replace(member, **changes)
    password_hash = None
    if "password" in body:
        password_hash = components.hasher.hash(domain.check_password(body["password"], member.username))
    components.store.save_staff(updated, password_hash)  # 409 last_admin, atomically
    changed = [
        name
        for name in SECURITY_STAFF_FIELDS
        if (password_hash is not None if name == "password" else getattr(member, name) != getattr(updated, name))
    ]
    _settings_changed(admin, "staff", updated.id, changed)
    reason = domain.session_end_reason(member, updated, password_hash is not None)
    if reason is not None and components.store.revoke_staff_sessions(updated.id, reason):
        components.sessions.security.record(
            "session_revoked",
            agency_id=admin.agency_id,
            actor_id=admin.subject,
            actor_kind="staff",
            outcome="succeeded",
            reason=reason,
            target_type="staff",
            target_id=updated.id,
            source=_client(),
        )
    return _staff_detail(updated, for_admin=True)


@directory.post("/teams")
@for_admins
def create_team(admin: Identity):
    body = validate(json_body(), NEW_TEAM)
    member_ids = _known_members(admin.agency_id, body.get("member_ids", []))
    team = Team(domain.new_id(domain.TEAM_PREFIX), admin.agency_id, body["name"], member_ids)
    _components().store.create_team(team)
    _settings_changed(admin, "team", team.id, ["created", "name", *(["member_ids"] if member_ids else [])])
    return _created(team_view(team), f"/api/v1/directory/teams/{team.id}")


@directory.patch("/teams/<team_id>")
@for_admins
def update_team(admin: Identity, team_id: str):
    body = validate(json_body(), TEAM_CHANGES)
    before = team = _existing_team(admin.agency_id, team_id)
    if "name" in body:
        team = replace(team, name=body["name"])
    if "member_ids" in body:
        team = replace(team, member_ids=_known_members(admin.agency_id, body["member_ids"]))
    _components().store.save_team(team)
    _settings_changed(admin, "team", team.id, _changed(before, team, ["name", "member_ids"]))
    return team_view(team)


@directory.delete("/teams/<team_id>")
@for_admins
def delete_team(admin: Identity, team_id: str):
    team_id = path_id(team_id, "team")
    if not _components().store.delete_team(admin.agency_id, team_id):
        raise NotFound("not_found", "no such team")
    _settings_changed(admin, "team", team_id, ["deleted"])
    return "", 204


@directory.patch("/agency")
@for_admins
def update_agency(admin: Identity):
    body = validate(json_body(), AGENCY_CHANGES)
    before = agency = _existing_agency(admin.agency_id)
    if "name" in body:
        agency = replace(agency, name=body["name"])
    if "time_zone" in body:
        agency = replace(agency, time_zone=domain.check_time_zone(body["time_zone"]))
    options = body.get("options", {})
    if "notify_linked_staff_on_schedule_change" in options:
        agency = replace(
            agency, notify_linked_staff_on_schedule_change=options["notify_linked_staff_on_schedule_change"]
        )
    if "compliance_escalation_minutes" in options:
        agency = replace(agency, compliance_escalation_minutes=options["compliance_escalation_minutes"])
    if "portal_consumer" in options:
        agency = replace(agency, portal_consumer=domain.check_portal_consumer(options["portal_consumer"]))
    if "idle_signout_minutes" in options:
        agency = replace(agency, idle_signout_minutes=options["idle_signout_minutes"])
    if "notify_ordering_provider_of_results" in options:
        agency = replace(agency, notify_ordering_provider_of_results=options["notify_ordering_provider_of_results"])
    if "erx_subscription" in options:
        agency = replace(agency, erx_subscription=options["erx_subscription"])
    if "erx_vendor" in options:
        agency = replace(agency, erx_vendor=domain.check_erx_vendor(options["erx_vendor"]))
    if "erx_clinic_id" in options:
        agency = replace(agency, erx_clinic_id=domain.check_erx_clinic_id(options["erx_clinic_id"]))
    terminology: Terminology = replace(agency.terminology, **body.get("terminology", {}))
    agency = replace(agency, terminology=terminology)
    _components().store.save_agency(agency)
    changed = _changed(before, agency, ["name", "time_zone"])
    changed += _changed(before, agency, list(AGENCY_CHANGES["options"].specs), "options.")
    changed += _changed(before.terminology, terminology, list(AGENCY_CHANGES["terminology"].specs), "terminology.")
    _settings_changed(admin, "agency", agency.id, changed)
    return agency_view(agency, for_admin=True)


@directory.post("/patients")
@for_admins
def create_patient(admin: Identity):
    body = validate(json_body(), NEW_PATIENT)
    patient = PortalPatient(
        id=domain.new_id(domain.PATIENT_PREFIX),
        agency_id=admin.agency_id,
        portal_user_id=body["portal_user_id"],
        display_name=body["display_name"],
    )
    patient = _components().store.create_patient(patient)
    return _created(patient_view(patient), f"/api/v1/directory/patients/{patient.id}")


@directory.get("/patients")
@for_staff
def list_patients(caller: Identity):
    """A page of the agency's portal patients (admins): recorded as one access record with an event
    for the listing and one per patient shown (services/directory/store.py record_patient_access)."""
    store = _components().store
    if not caller.is_admin:
        store.record_patient_access(caller, [], action="list", outcome="denied", listing="patients")
        raise Forbidden("forbidden", "this action needs the admin role")
    limit = query_int("limit", 50, 1, 200)
    before = request.args.get("before") or None
    if before is not None and not domain.is_patient_cursor(before):
        raise InvalidInput("invalid_query", "before must be a cursor returned by an earlier page", {"field": "before"})
    patients, cursor = store.list_patients(caller.agency_id, limit, before)
    shown = [patient_view(p) for p in patients]
    store.record_patient_access(caller, [p.id for p in patients], action="list", listing="patients")
    return {"patients": shown, "next_before": cursor or None}


@directory.get("/patients/<patient_id>")
@for_staff
def get_patient(caller: Identity, patient_id: str):
    """One portal patient (admins); recorded, and so is a refusal or an unknown id (denied)."""
    store = _components().store
    asked = patient_id if domain.is_well_formed_id(patient_id) else ""
    if not caller.is_admin:
        store.record_patient_access(caller, [asked], outcome="denied")
        raise Forbidden("forbidden", "this action needs the admin role")
    patient = store.get_patient(caller.agency_id, path_id(patient_id, "patient"))
    if patient is None:
        store.record_patient_access(caller, [asked], outcome="denied")
        raise NotFound("not_found", "no such patient")
    shown = patient_view(patient)
    store.record_patient_access(caller, [patient.id])
    return shown


# --- cloud addresses: Direct addresses and fax numbers linked to staff ---------------------------


@directory.get("/cloud-addresses")
@for_staff
def list_cloud_addresses(caller: Identity):
    """Admins: every address of the agency; other staff: the addresses linked to them."""
    store = _components().store
    addresses = store.list_cloud_addresses(caller.agency_id)
    if not caller.is_admin:
        addresses = [a for a in addresses if caller.subject in a.staff_ids]
    linked = sorted({staff_id for a in addresses for staff_id in a.staff_ids})
    staff = store.staff_by_ids(caller.agency_id, linked) if linked else {}
    return {"cloud_addresses": [cloud_address_view(a, staff) for a in addresses]}


@directory.post("/cloud-addresses")
@for_admins
def create_cloud_address(admin: Identity):
    body = validate(json_body(), NEW_CLOUD_ADDRESS)
    kind = domain.check_cloud_kind(body["kind"])
    address = CloudAddress(
        id=domain.new_id(domain.CLOUD_ADDRESS_PREFIX),
        agency_id=admin.agency_id,
        kind=kind,
        address=domain.check_cloud_address(kind, body["address"]),
        label=body.get("label", ""),
    )
    staff_ids, staff = _active_members(admin.agency_id, body.get("staff_ids", []))
    address = replace(address, staff_ids=staff_ids)
    _components().store.create_cloud_address(address)  # 409 address_taken, in any agency
    return _created(cloud_address_view(address, staff), f"/api/v1/directory/cloud-addresses/{address.id}")


@directory.patch("/cloud-addresses/<address_id>")
@for_admins
def update_cloud_address(admin: Identity, address_id: str):
    body = validate(json_body(), CLOUD_ADDRESS_CHANGES)
    store = _components().store
    address = _existing_cloud_address(admin.agency_id, address_id)
    if "label" in body:
        address = replace(address, label=body["label"])
    if "staff_ids" in body:
        address = replace(address, staff_ids=_active_members(admin.agency_id, body["staff_ids"])[0])
    if not store.save_cloud_address(address):
        raise NotFound("not_found", "no such address")
    staff = store.staff_by_ids(admin.agency_id, list(address.staff_ids)) if address.staff_ids else {}
    return cloud_address_view(address, staff)


@directory.delete("/cloud-addresses/<address_id>")
@for_admins
def delete_cloud_address(admin: Identity, address_id: str):
    if not _components().store.delete_cloud_address(admin.agency_id, path_id(address_id, "address")):
        raise NotFound("not_found", "no such address")
    return "", 204


# --- partner systems (authenticated by the gateway; see the module docstring) ---------------------


@partner.get("/whoami")
def whoami():
    """The partner the gateway vouches for: its consumer headers, believed only with the gateway's
    X-Gateway-Identity token for this request (services.kit.gateway_identity); 401 otherwise."""
    components = _components()
    caller = gateway_identity.verified_partner(
        components.settings.gateway_identity_keys, db=components.store.db, service="directory"
    )
    return {"consumer": caller.username, "credential": caller.credential or None}


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


def _existing_cloud_address(agency_id: str, address_id: str) -> CloudAddress:
    address = _components().store.get_cloud_address(agency_id, path_id(address_id, "address"))
    if address is None:
        raise NotFound("not_found", "no such address")
    return address


def _active_members(agency_id: str, staff_ids: list[str]) -> tuple[tuple[str, ...], dict[str, StaffMember]]:
    """The distinct ids (in order) and the members, all active staff of the agency; else 400
    `unknown_staff` naming the others (unknown, another agency's, or deactivated)."""
    wanted = list(dict.fromkeys(staff_ids))
    found = _components().store.staff_by_ids(agency_id, wanted) if wanted else {}
    unknown = [staff_id for staff_id in wanted if staff_id not in found or not found[staff_id].active]
    if unknown:
        raise InvalidInput(
            "unknown_staff", "some staff ids are not active staff of this agency", {"staff_ids": unknown}
        )
    return tuple(wanted), found


def _supervisor(member: StaffMember, wanted: str) -> str:
    """The supervisor id to store for `member` (400 `invalid_supervisor` unless an active colleague)."""
    supervisor = None
    if wanted and domain.is_well_formed_id(wanted) and wanted != member.id:
        supervisor = _components().store.get_staff(member.agency_id, wanted)
    return domain.check_supervisor(member.id, supervisor, wanted)


def _known_members(agency_id: str, member_ids: list[str]) -> tuple[str, ...]:
    found = _components().store.staff_by_ids(agency_id, member_ids)
    unknown = [staff_id for staff_id in member_ids if staff_id not in found]
    if unknown:
        raise InvalidInput("unknown_staff", "some member ids are not staff of this agency", {"staff_ids": unknown})
    return tuple(member_ids)
