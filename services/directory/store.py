"""The directory's MongoDB collections and the queries on them.

Query shapes (kept fast on nx-27017 and correct on MongoDB): equality is always
an explicit `$eq` on a scalar; lists (roles, team members) are written whole
with `$set` and never queried by element; flags are stored as booleans but read
through bool() because the embedded server returns them as 0/1; times are
epoch milliseconds. Every read of agency data takes the agency id and checks
it, so another agency's ids behave as unknown ones.

Revoking a session stages its `session.revoked.v1` event in the same update of
the session document (transactional outbox), so a revocation is never made
without being announced; the directory's outbox relay publishes it.

"At least one active admin" is kept without transactions by a counter on the
agency document (`active_admins`), changed only by guarded `$inc`s, and a flag
on each staff document (`admin_counted`, 0/1) saying whether that member is in
the count. Leaving the count takes the agency's counter down first, refused
while it is 1 (`{"active_admins": {"$gt": 1}}`), then flips the member's flag
1 -> 0 in the same update that saves the member; joining flips 0 -> 1 first and
then raises the counter. A flag flip is compare-and-set, so each member enters
and leaves the count once however requests interleave, and the counter is
never above the real number (a crash in between leaves it below: refusing a
legitimate demotion, never allowing the last admin to go).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import pymongo
from pymongo import ReturnDocument
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from services.directory import events
from services.directory.domain import (
    DEFAULT_COMPLIANCE_ESCALATION_MINUTES,
    DEFAULT_IDLE_SIGNOUT_MINUTES,
    Agency,
    CloudAddress,
    LoginAttempts,
    PortalPatient,
    StaffMember,
    Team,
    Terminology,
    patient_sort_key,
    team_ids_by_member,
    team_name_key,
)
from services.kit.audit import access_record, phi_accessed
from services.kit.auth import ROLE_ADMIN, Identity
from services.kit.crypto import PhiCipher
from services.kit.errors import Conflict
from services.kit.mongo import IndexSpec, ensure_indexes, eq, now_ms
from services.kit.outbox import with_outbox

AGENCIES = "agencies"
STAFF = "staff"
TEAMS = "teams"
PORTAL_PATIENTS = "portal_patients"
SESSIONS = "sessions"
REFRESH_TOKENS = "refresh_tokens"
LOGIN_ATTEMPTS = "login_attempts"
# Per client address: sign-in attempts per minute and failures per window (sessions.SignInLimits).
SIGN_IN_LIMITS = "sign_in_limits"
CLOUD_ADDRESSES = "cloud_addresses"
# Reads of PHI (portal patients) with their `phi.accessed.v1` events: an outbox collection.
ACCESS_RECORDS = "access_records"
PRODUCER = "directory"

INDEXES = [
    IndexSpec(STAFF, [("username", 1)], unique=True, name="staff_username_unique"),
    IndexSpec(STAFF, [("agency_id", 1), ("sort_key", 1)], name="staff_by_agency"),
    IndexSpec(TEAMS, [("agency_id", 1), ("name_key", 1)], unique=True, name="team_name_unique_in_agency"),
    IndexSpec(
        PORTAL_PATIENTS, [("agency_id", 1), ("portal_user_id", 1)], unique=True, name="portal_user_unique_in_agency"
    ),
    IndexSpec(PORTAL_PATIENTS, [("agency_id", 1), ("sort_key", -1)], name="portal_patients_by_agency"),
    IndexSpec(SESSIONS, [("staff_id", 1), ("created_at", 1)], name="sessions_by_staff"),
    IndexSpec(SESSIONS, [("revoked_at", 1)], name="sessions_by_revoked_at"),
    IndexSpec(REFRESH_TOKENS, [("session_id", 1)], name="refresh_tokens_by_session"),
    IndexSpec(LOGIN_ATTEMPTS, [("expires_at", 1)], name="login_attempts_by_expiry"),
    # Open sessions carry `idle_expires_at` (removed when they end): the idle sweep's range.
    IndexSpec(SESSIONS, [("idle_expires_at", 1)], name="sessions_by_idle_deadline"),
    IndexSpec(SIGN_IN_LIMITS, [("expires_at", 1)], name="sign_in_limits_by_expiry"),
    # An address belongs to one agency: unique across all of them (ResolveCloudAddress looks it up here).
    IndexSpec(CLOUD_ADDRESSES, [("kind", 1), ("address", 1)], unique=True, name="cloud_address_unique"),
    IndexSpec(CLOUD_ADDRESSES, [("agency_id", 1), ("kind", 1), ("address", 1)], name="cloud_addresses_by_agency"),
]

# Staff NPIs: unique within an agency, only among members who have one (the field is absent
# otherwise). nx-27017 ignores the filter but treats an absent field as NULL, which never clashes.
STAFF_NPI_INDEX = "staff_npi_unique_in_agency"
STAFF_NPI_FILTER = {"npi": {"$exists": True}}

PATIENT_NAME_FIELD = "display_name"
# Staff reads that are not a sign-in never load the password hash.
STAFF_WITHOUT_SECRETS = {"password_hash": 0}
# A session's own fields, without the outbox entries staged on it.
SESSION_FIELDS = {
    "staff_id": 1,
    "agency_id": 1,
    "created_at": 1,
    "expires_at": 1,
    "revoked_at": 1,
    "revoked_reason": 1,
    "password_changed_at": 1,
    "last_activity_at": 1,
    "idle_expires_at": 1,
}
REVOKED_SESSION_FIELDS = {"staff_id": 1, "agency_id": 1, "revoked_at": 1, "revoked_reason": 1}
REFRESH_TOKEN_FIELDS = {"session_id": 1, "staff_id": 1, "agency_id": 1, "expires_at": 1}
# Tries before a save that keeps losing the race for a member's admin flag gives up (409).
ADMIN_FLAG_TRIES = 3


@dataclass(frozen=True)
class StaffAuth:
    """A staff member with what sign-in needs: the hash (credentials() only) and when the password last changed."""

    member: StaffMember
    password_changed_at: int
    password_hash: str = field(default="", repr=False)


def _staff_sort_key(display_name: str, staff_id: str) -> str:
    return f"{display_name.casefold()}\x1f{staff_id}"


def _agency(doc: dict) -> Agency:
    return Agency(
        id=doc["_id"],
        name=doc["name"],
        time_zone=doc.get("time_zone", "UTC"),
        notify_linked_staff_on_schedule_change=bool(doc.get("notify_linked_staff_on_schedule_change", False)),
        terminology=Terminology(
            patient_singular=doc.get("patient_singular") or Terminology.patient_singular,
            patient_plural=doc.get("patient_plural") or Terminology.patient_plural,
        ),
        portal_consumer=doc.get("portal_consumer") or "",
        compliance_escalation_minutes=int(
            doc.get("compliance_escalation_minutes") or DEFAULT_COMPLIANCE_ESCALATION_MINUTES
        ),
        idle_signout_minutes=int(doc.get("idle_signout_minutes") or DEFAULT_IDLE_SIGNOUT_MINUTES),
        notify_ordering_provider_of_results=bool(doc.get("notify_ordering_provider_of_results", False)),
        erx_subscription=bool(doc.get("erx_subscription", False)),
        erx_vendor=doc.get("erx_vendor") or "",
        erx_clinic_id=doc.get("erx_clinic_id") or "",
    )


def _staff(doc: dict) -> StaffMember:
    return StaffMember(
        id=doc["_id"],
        agency_id=doc["agency_id"],
        username=doc["username"],
        display_name=doc["display_name"],
        email=doc.get("email", ""),
        roles=tuple(doc.get("roles") or ()),
        lab_result_notification=bool(doc.get("lab_result_notification", False)),
        eprescribing_enabled=bool(doc.get("eprescribing_enabled", False)),
        active=not doc.get("deactivated_at"),
        supervisor_id=doc.get("supervisor_id") or "",
        npi=doc.get("npi") or "",
        erx_clinician_id=doc.get("erx_clinician_id") or "",
    )


def _team(doc: dict) -> Team:
    return Team(doc["_id"], doc["agency_id"], doc["name"], tuple(doc.get("member_ids") or ()))


def _cloud_address(doc: dict) -> CloudAddress:
    return CloudAddress(
        id=doc["_id"],
        agency_id=doc["agency_id"],
        kind=doc["kind"],
        address=doc["address"],
        label=doc.get("label") or "",
        staff_ids=tuple(doc.get("staff_ids") or ()),
    )


def _address_taken() -> Conflict:
    return Conflict("address_taken", "this address is already registered", {"field": "address"})


def _staff_auth(doc: dict) -> StaffAuth:
    return StaffAuth(_staff(doc), int(doc.get("password_changed_at") or 0), doc.get("password_hash", ""))


def _last_admin() -> Conflict:
    return Conflict("last_admin", "the agency must keep at least one active admin")


def _staff_fields(member: StaffMember, now: int) -> dict:
    return {
        "agency_id": member.agency_id,
        "username": member.username,
        "display_name": member.display_name,
        "sort_key": _staff_sort_key(member.display_name, member.id),
        "email": member.email,
        "roles": list(member.roles),
        "lab_result_notification": member.lab_result_notification,
        "eprescribing_enabled": member.eprescribing_enabled,
        "supervisor_id": member.supervisor_id,
        "npi": member.npi,
        "erx_clinician_id": member.erx_clinician_id,
        "updated_at": now,
    }


def _staff_update(fields: dict) -> dict:
    """`$set` of a member's fields; a member without an NPI has no `npi` field (see STAFF_NPI_INDEX)."""
    to_set = dict(fields)
    if to_set.get("npi"):
        return {"$set": to_set}
    to_set.pop("npi", None)
    return {"$set": to_set, "$unset": {"npi": ""}}


def _npi_taken() -> Conflict:
    return Conflict("npi_taken", "another staff member of the agency has this NPI", {"field": "npi"})


def _names_npi(exc: DuplicateKeyError) -> bool:
    """Did the NPI index (rather than the username's) refuse the write? MongoDB gives the key pattern;
    nx-27017 names the index it derived from the keys (idx_staff_agency_id_npi) in its message."""
    details = exc.details or {}
    if "keyPattern" in details:
        return "npi" in details["keyPattern"]
    message = str(details.get("errmsg") or exc)
    return STAFF_NPI_INDEX in message or "_agency_id_npi'" in message


def _fill_absent(collection, key: dict, fields: dict) -> int:
    """`$set` each field where the document lacks it, one guarded update per field, so a value
    written since (by an admin, or a concurrent fill) is never overwritten."""
    filled = 0
    for name, value in fields.items():
        filled += collection.update_one({**key, name: {"$exists": False}}, {"$set": {name: value}}).modified_count
    return filled


def _team_name_taken() -> Conflict:
    return Conflict("team_name_taken", "the agency already has a team with this name", {"field": "name"})


class DirectoryStore:
    # Staff ids are fetched with `_id $in` (primary key, no sort) in batches of at most this many.
    IN_BATCH = 500

    def __init__(self, db: Database, cipher: PhiCipher):
        self.db = db
        self.cipher = cipher
        self.agencies = db[AGENCIES]
        self.staff = db[STAFF]
        self.teams = db[TEAMS]
        self.patients = db[PORTAL_PATIENTS]
        self.sessions = db[SESSIONS]
        self.refresh_tokens = db[REFRESH_TOKENS]
        self.login_attempts = db[LOGIN_ATTEMPTS]
        self.cloud_addresses = db[CLOUD_ADDRESSES]

    def ensure_indexes(self) -> None:
        """Indexes, and the start-up data migrations (each one idempotent)."""
        ensure_indexes(self.db, INDEXES)
        self.staff.create_index(
            [("agency_id", 1), ("npi", 1)], unique=True, name=STAFF_NPI_INDEX, partialFilterExpression=STAFF_NPI_FILTER
        )
        self.cipher.keyring.ensure_indexes()
        self.initialise_admin_counts()
        # Failed sign-ins stored before they were keyed by a hash had the typed username as id: drop them.
        self.login_attempts.delete_many({"expires_at": {"$exists": False}})

    # --- agencies ---------------------------------------------------------------------------

    def get_agency(self, agency_id: str) -> Agency | None:
        doc = self.agencies.find_one({"_id": eq(agency_id)})
        return _agency(doc) if doc else None

    def create_agency(self, agency: Agency) -> None:
        now = now_ms()
        try:
            self.agencies.insert_one(
                {
                    "_id": agency.id,
                    **self._agency_fields(agency),
                    "active_admins": 0,
                    "created_at": now,
                    "updated_at": now,
                }
            )
        except DuplicateKeyError as exc:
            raise Conflict("agency_exists", "an agency with this id exists") from exc

    def save_agency(self, agency: Agency) -> None:
        self.agencies.update_one(
            {"_id": eq(agency.id)}, {"$set": {**self._agency_fields(agency), "updated_at": now_ms()}}
        )

    @staticmethod
    def _agency_fields(agency: Agency) -> dict:
        return {
            "name": agency.name,
            "time_zone": agency.time_zone,
            "notify_linked_staff_on_schedule_change": agency.notify_linked_staff_on_schedule_change,
            "patient_singular": agency.terminology.patient_singular,
            "patient_plural": agency.terminology.patient_plural,
            "portal_consumer": agency.portal_consumer,
            "compliance_escalation_minutes": agency.compliance_escalation_minutes,
            "idle_signout_minutes": agency.idle_signout_minutes,
            "notify_ordering_provider_of_results": agency.notify_ordering_provider_of_results,
            "erx_subscription": agency.erx_subscription,
            "erx_vendor": agency.erx_vendor,
            "erx_clinic_id": agency.erx_clinic_id,
        }

    def fill_absent_agency_fields(self, agency_id: str, fields: dict) -> int:
        """Set each of these fields on the agency only where its document lacks it (a document
        written before the field existed; every save writes it). Returns how many were set."""
        return _fill_absent(self.agencies, {"_id": eq(agency_id)}, fields)

    # --- staff ------------------------------------------------------------------------------

    def credentials(self, username: str) -> StaffAuth | None:
        """The staff member signing in with this (lowercased) username, with their password hash."""
        doc = self.staff.find_one({"username": eq(username)})
        return _staff_auth(doc) if doc else None

    def staff_auth(self, agency_id: str, staff_id: str) -> StaffAuth | None:
        """The member as stored now and when their password last changed (no hash)."""
        doc = self.staff.find_one({"_id": eq(staff_id)}, STAFF_WITHOUT_SECRETS)
        if doc is None or doc.get("agency_id") != agency_id:
            return None
        return _staff_auth(doc)

    def rehash_password(self, staff_id: str, old_hash: str, new_hash: str) -> bool:
        """Replace a hash made with old parameters (same password): only if it is still the stored one,
        so a password reset made meanwhile is never overwritten. Not a password change."""
        result = self.staff.update_one(
            {"_id": eq(staff_id), "password_hash": eq(old_hash)}, {"$set": {"password_hash": new_hash}}
        )
        return result.modified_count == 1

    def get_staff(self, agency_id: str, staff_id: str) -> StaffMember | None:
        doc = self.staff.find_one({"_id": eq(staff_id)}, STAFF_WITHOUT_SECRETS)
        if doc is None or doc.get("agency_id") != agency_id:
            return None
        return _staff(doc)

    def list_staff(self, agency_id: str) -> list[StaffMember]:
        """Every staff member of the agency, by display name."""
        cursor = self.staff.find({"agency_id": eq(agency_id)}, STAFF_WITHOUT_SECRETS).sort("sort_key", 1)
        return [_staff(doc) for doc in cursor]

    def staff_by_ids(self, agency_id: str, staff_ids: list[str]) -> dict[str, StaffMember]:
        """The agency's staff among these ids (unknown and other agencies' ids are left out): one
        `_id $in` query per IN_BATCH ids, each document checked against the agency as get_staff does."""
        ids = list(dict.fromkeys(staff_ids))
        found: dict[str, StaffMember] = {}
        for start in range(0, len(ids), self.IN_BATCH):
            batch = ids[start : start + self.IN_BATCH]
            for doc in self.staff.find({"_id": {"$in": batch}}, STAFF_WITHOUT_SECRETS):
                if doc.get("agency_id") == agency_id:
                    found[doc["_id"]] = _staff(doc)
        return found

    def staff_by_npis(self, agency_id: str, npis: list[str]) -> dict[str, StaffMember]:
        """The agency's staff holding these NPIs, by NPI (unknown ones left out): one `$eq` lookup on
        (agency_id, npi) each, since `$in` scans on nx-27017 and a message names only a handful."""
        found: dict[str, StaffMember] = {}
        for npi in dict.fromkeys(npis):
            doc = self.staff.find_one({"agency_id": eq(agency_id), "npi": eq(npi)}, STAFF_WITHOUT_SECRETS)
            if doc is not None:
                found[npi] = _staff(doc)
        return found

    def fill_absent_staff_fields(self, agency_id: str, staff_id: str, fields: dict) -> int:
        """As fill_absent_agency_fields, for one staff member of the agency."""
        return _fill_absent(self.staff, {"_id": eq(staff_id), "agency_id": eq(agency_id)}, fields)

    def check_npi_free(self, member: StaffMember) -> None:
        """Conflict `npi_taken` when another member of the agency holds the member's NPI. Checked before
        a write because nx-27017's find_one_and_update drops a write the unique index refuses."""
        if not member.npi:
            return
        holder = self.staff.find_one({"agency_id": eq(member.agency_id), "npi": eq(member.npi)}, {"_id": 1})
        if holder is not None and holder["_id"] != member.id:
            raise _npi_taken()

    def create_staff(self, member: StaffMember, password_hash: str) -> None:
        self.check_npi_free(member)
        now = now_ms()
        doc = {"_id": member.id, **_staff_fields(member, now), "password_hash": password_hash}
        if not member.npi:
            del doc["npi"]
        doc.update(
            created_at=now,
            password_changed_at=now,
            deactivated_at=0 if member.active else now,
            admin_counted=int(member.counts_as_admin),
        )
        try:
            self.staff.insert_one(doc)
        except DuplicateKeyError as exc:
            if _names_npi(exc):
                raise _npi_taken() from exc
            raise Conflict("username_taken", "this username is already in use", {"field": "username"}) from exc
        if member.counts_as_admin:
            self._count_admin(member.agency_id, 1)

    def save_staff(self, member: StaffMember, password_hash: str | None = None) -> None:
        """Save an existing member's changes; Conflict `last_admin` if the agency would have no active admin
        left, `npi_taken` if another member of the agency holds the NPI."""
        self.check_npi_free(member)
        now = now_ms()
        fields = _staff_fields(member, now)
        if member.active:
            fields["deactivated_at"] = 0
        if password_hash is not None:
            fields.update(password_hash=password_hash, password_changed_at=now)
        if member.counts_as_admin:
            self._save_counted_admin(member, fields)
        else:
            self._save_uncounted(member, fields)
        if not member.active:
            # Keeps the first deactivation time when an inactive member is edited again.
            self.staff.update_one({"_id": eq(member.id), "deactivated_at": eq(0)}, {"$set": {"deactivated_at": now}})

    def _save_counted_admin(self, member: StaffMember, fields: dict) -> None:
        """Save a member who is (now) an active admin: flag first, then the agency's counter."""
        try:
            before = self.staff.find_one_and_update(
                {"_id": eq(member.id), "agency_id": eq(member.agency_id)},
                _staff_update({**fields, "admin_counted": 1}),
                projection={"admin_counted": 1},
                return_document=ReturnDocument.BEFORE,
            )
        except DuplicateKeyError as exc:
            raise _npi_taken() from exc
        if before is not None and before.get("admin_counted") != 1:
            self._count_admin(member.agency_id, 1)

    def _save_uncounted(self, member: StaffMember, fields: dict) -> None:
        """Save a member who is not (or no longer) an active admin, leaving the count if they were in it."""
        key = {"_id": eq(member.id), "agency_id": eq(member.agency_id)}
        uncounted = _staff_update({**fields, "admin_counted": 0})
        for _ in range(ADMIN_FLAG_TRIES):
            doc = self.staff.find_one(key, {"admin_counted": 1})
            if doc is None:
                return
            counted = doc.get("admin_counted")
            if counted != 1:
                # Not in the count (a document an older version wrote may lack the flag: not counted either).
                guard = eq(0) if counted is not None else {"$exists": False}
                if self._update_member({**key, "admin_counted": guard}, uncounted):
                    return
                continue  # promoted meanwhile: look again
            released = self.agencies.find_one_and_update(
                {"_id": eq(member.agency_id), "active_admins": {"$gt": 1}},
                {"$inc": {"active_admins": -1}},
                projection={"_id": 1},
            )
            if released is None:
                raise _last_admin()
            try:
                saved = self._update_member({**key, "admin_counted": eq(1)}, uncounted)
            except Conflict:
                self._count_admin(member.agency_id, 1)  # the NPI was refused: the member stays counted
                raise
            if saved:
                return
            self._count_admin(member.agency_id, 1)  # someone else took them out of the count: give it back
        raise Conflict("staff_changed", "the staff member was changed at the same time; try again")

    def _update_member(self, guard: dict, update: dict) -> bool:
        """One guarded update of a staff document; Conflict `npi_taken` when the NPI index refuses it."""
        try:
            return bool(self.staff.update_one(guard, update).matched_count)
        except DuplicateKeyError as exc:
            raise _npi_taken() from exc

    def _count_admin(self, agency_id: str, delta: int) -> None:
        self.agencies.update_one({"_id": eq(agency_id)}, {"$inc": {"active_admins": delta}})

    def active_admins(self, agency_id: str) -> int:
        doc = self.agencies.find_one({"_id": eq(agency_id)}, {"active_admins": 1})
        return int((doc or {}).get("active_admins") or 0)

    def initialise_admin_counts(self) -> None:
        """Start-up migration: agencies stored before the active-admin counter get it, and their staff the flag.

        Agencies that already have a counter are left alone (a running replica keeps it exact); a staff
        document without the flag there (written by an older version) is marked as not counted, which
        can only make the counter lower than the real number.
        """
        for agency in self.agencies.find({}, {"active_admins": 1}):
            if "active_admins" in agency:
                continue
            count = 0
            for doc in self.staff.find({"agency_id": eq(agency["_id"])}, {"roles": 1, "deactivated_at": 1}):
                counted = int(ROLE_ADMIN in (doc.get("roles") or ()) and not doc.get("deactivated_at"))
                self.staff.update_one({"_id": eq(doc["_id"])}, {"$set": {"admin_counted": counted}})
                count += counted
            self.agencies.update_one(
                {"_id": eq(agency["_id"]), "active_admins": {"$exists": False}}, {"$set": {"active_admins": count}}
            )
        self.staff.update_many({"admin_counted": {"$exists": False}}, {"$set": {"admin_counted": 0}})

    # --- teams ------------------------------------------------------------------------------

    def list_teams(self, agency_id: str) -> list[Team]:
        return [_team(doc) for doc in self.teams.find({"agency_id": eq(agency_id)}).sort("name_key", 1)]

    def team_ids_of(self, agency_id: str, staff_ids: Iterable[str]) -> dict[str, list[str]]:
        """Which of the agency's teams each of these members is in (every id present, [] for none)."""
        by_member = team_ids_by_member(self.list_teams(agency_id))
        return {staff_id: by_member.get(staff_id, []) for staff_id in staff_ids}

    def get_team(self, agency_id: str, team_id: str) -> Team | None:
        doc = self.teams.find_one({"_id": eq(team_id)})
        if doc is None or doc.get("agency_id") != agency_id:
            return None
        return _team(doc)

    def create_team(self, team: Team) -> None:
        now = now_ms()
        doc = {"_id": team.id, **self._team_fields(team), "created_at": now, "updated_at": now}
        try:
            self.teams.insert_one(doc)
        except DuplicateKeyError as exc:
            raise _team_name_taken() from exc

    def save_team(self, team: Team) -> None:
        try:
            self.teams.update_one(
                {"_id": eq(team.id), "agency_id": eq(team.agency_id)},
                {"$set": {**self._team_fields(team), "updated_at": now_ms()}},
            )
        except DuplicateKeyError as exc:
            raise _team_name_taken() from exc

    def delete_team(self, agency_id: str, team_id: str) -> bool:
        result = self.teams.delete_one({"_id": eq(team_id), "agency_id": eq(agency_id)})
        return result.deleted_count == 1

    @staticmethod
    def _team_fields(team: Team) -> dict:
        return {
            "agency_id": team.agency_id,
            "name": team.name,
            "name_key": team_name_key(team.name),
            "member_ids": list(team.member_ids),
        }

    # --- portal patients (display names sealed: PHI) ----------------------------------------

    def create_patient(self, patient: PortalPatient) -> PortalPatient:
        now = now_ms()
        sealed = self.cipher.seal(patient.agency_id, patient.id, PATIENT_NAME_FIELD, patient.display_name)
        doc = {
            "_id": patient.id,
            "agency_id": patient.agency_id,
            "portal_user_id": patient.portal_user_id,
            "display_name_sealed": sealed,
            "sort_key": patient_sort_key(now, patient.id),
            "created_at": now,
        }
        try:
            self.patients.insert_one(doc)
        except DuplicateKeyError as exc:
            raise Conflict(
                "portal_user_taken", "this portal user is already linked", {"field": "portal_user_id"}
            ) from exc
        return replace(patient, created_at=now)

    def get_patient(self, agency_id: str, patient_id: str) -> PortalPatient | None:
        doc = self.patients.find_one({"_id": eq(patient_id)})
        if doc is None or doc.get("agency_id") != agency_id:
            return None
        return self._patient(doc)

    def patient_by_portal_user(self, agency_id: str, portal_user_id: str) -> PortalPatient | None:
        """The agency's patient with this portal user id (index portal_user_unique_in_agency)."""
        doc = self.patients.find_one({"agency_id": eq(agency_id), "portal_user_id": eq(portal_user_id)})
        return self._patient(doc) if doc else None

    def list_patients(self, agency_id: str, limit: int, before: str | None = None) -> tuple[list[PortalPatient], str]:
        """Newest first; returns the page and the cursor for the next one ("" when done)."""
        query: dict = {"agency_id": eq(agency_id)}
        if before:
            query["sort_key"] = {"$lt": before}
        docs = list(self.patients.find(query).sort("sort_key", -1).limit(limit + 1))
        cursor = docs[limit - 1]["sort_key"] if len(docs) > limit else ""
        return [self._patient(doc) for doc in docs[:limit]], cursor

    def _patient(self, doc: dict) -> PortalPatient:
        name = self.cipher.open(doc["agency_id"], doc["_id"], PATIENT_NAME_FIELD, doc["display_name_sealed"])
        return PortalPatient(
            id=doc["_id"],
            agency_id=doc["agency_id"],
            portal_user_id=doc["portal_user_id"],
            display_name=name,
            created_at=doc.get("created_at", 0),
        )

    def record_patient_access(
        self,
        caller: Identity,
        patient_ids: Iterable[str],
        *,
        action: str = "read",
        outcome: str = "allowed",
        listing: str = "",
        portal_user_id: str | None = None,
    ) -> None:
        """One access-record document (services.kit.audit) for portal patients read or refused: an
        event per patient, naming them as `patient_id`, after a first event for the listing when
        `listing` names one, or for the portal user asked about when `portal_user_id` is given (a
        refused or unknown one: no patient is known). One insert however many patients were shown;
        the directory's outbox relay publishes the events (collection ACCESS_RECORDS)."""
        patient_ids = list(patient_ids)
        named = {"patient_list": listing} if listing else {}
        if portal_user_id is not None:
            named["portal_user"] = portal_user_id
        events = [
            phi_accessed(
                caller, service=PRODUCER, resource_type=kind, resource_id=rid, action=action, outcome=outcome
            )
            for kind, rid in named.items()
        ]
        events += [
            phi_accessed(
                caller,
                service=PRODUCER,
                resource_type="portal_patient",
                resource_id=patient_id,
                action=action,
                outcome=outcome,
                patient_id=patient_id,
            )
            for patient_id in patient_ids
        ]
        if not events:
            return
        resource_id = next(iter(named.values())) if named else patient_ids[0]
        record = access_record(caller, events, resource_id=resource_id, action=action, outcome=outcome)
        self.db[ACCESS_RECORDS].insert_one({**record, "count": len(patient_ids)})

    # --- cloud addresses (Direct addresses and fax numbers linked to staff) ----------------------
    # Addresses are stored normalised (domain.normalize_cloud_address); linked staff are written whole
    # and never queried by element: an agency has a handful of addresses, filtered in Python.

    def list_cloud_addresses(self, agency_id: str) -> list[CloudAddress]:
        """The agency's addresses, by kind then address."""
        cursor = self.cloud_addresses.find({"agency_id": eq(agency_id)}).sort([("kind", 1), ("address", 1)])
        return [_cloud_address(doc) for doc in cursor]

    def get_cloud_address(self, agency_id: str, address_id: str) -> CloudAddress | None:
        doc = self.cloud_addresses.find_one({"_id": eq(address_id)})
        if doc is None or doc.get("agency_id") != agency_id:
            return None
        return _cloud_address(doc)

    def find_cloud_address(self, kind: str, address: str) -> CloudAddress | None:
        """Any agency's address of this kind (normalised), by the unique (kind, address) index."""
        doc = self.cloud_addresses.find_one({"kind": eq(kind), "address": eq(address)})
        return _cloud_address(doc) if doc else None

    def create_cloud_address(self, address: CloudAddress) -> None:
        now = now_ms()
        doc = {"_id": address.id, **self._cloud_address_fields(address), "created_at": now, "updated_at": now}
        try:
            self.cloud_addresses.insert_one(doc)
        except DuplicateKeyError as exc:
            raise _address_taken() from exc

    def save_cloud_address(self, address: CloudAddress) -> bool:
        """Label and linked staff (kind and address never change); False when it is gone."""
        result = self.cloud_addresses.update_one(
            {"_id": eq(address.id), "agency_id": eq(address.agency_id)},
            {"$set": {"label": address.label, "staff_ids": list(address.staff_ids), "updated_at": now_ms()}},
        )
        return result.matched_count == 1

    def delete_cloud_address(self, agency_id: str, address_id: str) -> bool:
        result = self.cloud_addresses.delete_one({"_id": eq(address_id), "agency_id": eq(agency_id)})
        return result.deleted_count == 1

    @staticmethod
    def _cloud_address_fields(address: CloudAddress) -> dict:
        return {
            "agency_id": address.agency_id,
            "kind": address.kind,
            "address": address.address,
            "label": address.label,
            "staff_ids": list(address.staff_ids),
        }

    # --- sessions and refresh tokens --------------------------------------------------------

    def create_session(
        self,
        session_id: str,
        member: StaffMember,
        now: int,
        expires_at: int,
        password_changed_at: int,
        *,
        idle_expires_at: int | None = None,
    ) -> dict:
        """A new session; `password_changed_at` is the password version the sign-in checked, and
        `idle_expires_at` when it ends unless activity is reported (sign-in is activity)."""
        session = {
            "_id": session_id,
            "staff_id": member.id,
            "agency_id": member.agency_id,
            "created_at": now,
            "expires_at": expires_at,
            "revoked_at": 0,
            "revoked_reason": "",
            "password_changed_at": password_changed_at,
        }
        if idle_expires_at is not None:
            session.update(last_activity_at=now, idle_expires_at=idle_expires_at)
        self.sessions.insert_one(dict(session))
        return session

    def get_session(self, session_id: str) -> dict | None:
        return self.sessions.find_one({"_id": eq(session_id)}, SESSION_FIELDS)

    def revoke_session(self, session_id: str, reason: str) -> bool:
        """End a session now, announcing it; False when unknown or already ended."""
        session = self.sessions.find_one({"_id": eq(session_id)}, {"staff_id": 1, "agency_id": 1, "revoked_at": 1})
        if session is None or session.get("revoked_at"):
            return False
        return self._revoke(session, reason, now_ms())

    def revoke_staff_sessions(self, staff_id: str, reason: str) -> int:
        """End every open session of a staff member (deactivation, password reset); returns how many."""
        now = now_ms()
        cursor = self.sessions.find(
            {"staff_id": eq(staff_id), "revoked_at": eq(0)}, {"staff_id": 1, "agency_id": 1, "expires_at": 1}
        )
        revoked = 0
        for session in cursor:
            # A session past its end whose last access token has expired too needs no announcement.
            announce = events.access_expires_at(int(session.get("expires_at") or 0)) > now
            revoked += self._revoke(session, reason, now, announce=announce)
        return revoked

    def _revoke(self, session: dict, reason: str, now: int, *, announce: bool = True) -> bool:
        """Mark the session revoked and, in the same single-document update, stage its event."""
        update = {"$set": {"revoked_at": now, "revoked_reason": reason}}
        if announce:
            update = with_outbox(update, [events.session_revoked(session, reason, now)])
        result = self.sessions.update_one({"_id": eq(session["_id"]), "revoked_at": eq(0)}, update)
        return result.modified_count == 1

    def is_session_revoked(self, session_id: str) -> bool:
        """True for a revoked session and for one this directory never issued (fail closed)."""
        doc = self.sessions.find_one({"_id": eq(session_id)}, {"revoked_at": 1})
        return doc is None or bool(doc.get("revoked_at"))

    def revoked_sessions_since(self, since_ms: int, limit: int) -> list[dict]:
        """Sessions revoked at or after `since_ms` (> 0), oldest first; served by the revoked_at index."""
        cursor = (
            self.sessions.find({"revoked_at": {"$gte": max(1, since_ms)}}, REVOKED_SESSION_FIELDS)
            .sort("revoked_at", pymongo.ASCENDING)
            .limit(limit)
        )
        return list(cursor)

    def add_refresh_token(self, token_hash: str, session: dict, now: int) -> None:
        self.refresh_tokens.insert_one(
            {
                "_id": token_hash,
                "session_id": session["_id"],
                "staff_id": session["staff_id"],
                "agency_id": session["agency_id"],
                "issued_at": now,
                "expires_at": session["expires_at"],
                "used_at": 0,
            }
        )

    def find_refresh_token(self, token_hash: str) -> dict | None:
        return self.refresh_tokens.find_one({"_id": eq(token_hash)}, REFRESH_TOKEN_FIELDS)

    def use_refresh_token(self, token_hash: str, now: int) -> tuple[dict | None, bool]:
        """Spend the token in one write: (its record, True) the first time; (record, False) when it had
        been spent already (a replay); (None, False) when unknown. Only a failed spend reads again."""
        doc = self.refresh_tokens.find_one_and_update(
            {"_id": eq(token_hash), "used_at": eq(0)},
            {"$set": {"used_at": now}},
            projection=REFRESH_TOKEN_FIELDS,
            return_document=ReturnDocument.BEFORE,
        )
        if doc is not None:
            return doc, True
        return self.find_refresh_token(token_hash), False

    # --- idle sessions ---------------------------------------------------------------------------
    # An open session carries `last_activity_at` (the page's last report of its user's activity) and
    # `idle_expires_at` (when it ends without more); the field is removed when it ends, so the idle
    # sweep's range `idle_expires_at <= now` on its own index holds only sessions still to end.

    def record_activity(self, session_id: str, now: int, idle_expires_at: int) -> bool:
        """Move an open session's idle deadline; False when it has ended or its deadline has passed.
        A session stored before sessions had a deadline gets one here."""
        update = {"$set": {"last_activity_at": now, "idle_expires_at": idle_expires_at}}
        live = {"_id": eq(session_id), "revoked_at": eq(0), "expires_at": {"$gt": now}}
        if self.sessions.update_one({**live, "idle_expires_at": {"$gt": now}}, update).matched_count:
            return True
        return bool(self.sessions.update_one({**live, "idle_expires_at": {"$exists": False}}, update).matched_count)

    def start_idle_clock(self, session_id: str, now: int, idle_expires_at: int) -> None:
        """Give a session stored before sessions had an idle deadline one, counted from now."""
        self.sessions.update_one(
            {"_id": eq(session_id), "revoked_at": eq(0), "idle_expires_at": {"$exists": False}},
            {"$set": {"last_activity_at": now, "idle_expires_at": idle_expires_at}},
        )

    def idle_sessions(self, now: int, limit: int) -> list[dict]:
        """Sessions whose idle deadline has passed, earliest first (ended ones too, until cleared)."""
        cursor = (
            self.sessions.find(
                {"idle_expires_at": {"$lte": now}},
                {"staff_id": 1, "agency_id": 1, "expires_at": 1, "revoked_at": 1, "idle_expires_at": 1},
            )
            .sort("idle_expires_at", pymongo.ASCENDING)
            .limit(limit)
        )
        return list(cursor)

    def end_idle_session(self, session: dict, reason: str, now: int, *, announce: bool) -> bool:
        """Revoke an open session whose idle deadline has passed, staging its `session.revoked.v1` in the
        same update; False when it ended meanwhile or activity moved its deadline."""
        update = {"$set": {"revoked_at": now, "revoked_reason": reason}, "$unset": {"idle_expires_at": ""}}
        if announce:
            update = with_outbox(update, [events.session_revoked(session, reason, now)])
        guard = {"_id": eq(session["_id"]), "revoked_at": eq(0), "idle_expires_at": {"$lte": now}}
        return self.sessions.update_one(guard, update).modified_count == 1

    def clear_idle_deadline(self, session_id: str) -> None:
        """An ended session leaves the idle sweep's range."""
        self.sessions.update_one(
            {"_id": eq(session_id), "revoked_at": {"$gt": 0}}, {"$unset": {"idle_expires_at": ""}}
        )

    # --- failed sign-ins ---------------------------------------------------------------------
    # Keyed by domain.login_attempt_key (a keyed hash: what was typed is never stored). Each document
    # lives until its window and its lock have both passed (`expires_at`); expired ones are ignored
    # and deleted whenever a new window opens, so their number stays bounded by recent failures.

    def get_login_attempts(self, key: str, now: int) -> LoginAttempts | None:
        doc = self.login_attempts.find_one({"_id": eq(key)}, {"locked_until": 1, "expires_at": 1})
        if doc is None or int(doc.get("expires_at") or 0) <= now:
            return None
        return LoginAttempts(locked_until=int(doc.get("locked_until") or 0))

    def count_login_failure(self, key: str, now: int, window_s: int) -> int:
        """Add one failure to the key's open window (or start a new one); returns the count."""
        doc = self.login_attempts.find_one_and_update(
            {"_id": eq(key), "window_started_at": {"$gt": now - window_s * 1000}},
            {"$inc": {"failures": 1}},
            projection={"failures": 1},
            return_document=ReturnDocument.AFTER,
        )
        if doc is not None:
            return doc["failures"]
        self.login_attempts.delete_many({"expires_at": {"$lte": now}})
        try:
            self.login_attempts.update_one(
                {"_id": eq(key)},
                {
                    "$set": {
                        "failures": 1,
                        "window_started_at": now,
                        "locked_until": 0,
                        "expires_at": now + window_s * 1000,
                    }
                },
                upsert=True,
            )
        except DuplicateKeyError:
            return self.count_login_failure(key, now, window_s)  # a concurrent failure opened the window
        return 1

    def lock_username(self, key: str, until: int) -> None:
        self.login_attempts.update_one(
            {"_id": eq(key)}, {"$set": {"locked_until": until}, "$max": {"expires_at": until}}
        )

    def clear_login_failures(self, key: str) -> None:
        self.login_attempts.delete_one({"_id": eq(key)})

    # --- sign-in limits per client address ------------------------------------------------------
    # Fixed-window counters keyed by the caller (a keyed hash of the address and the window's start):
    # one upsert with $inc per count, so every replica spends the same budget. A document lives until
    # its window has passed (`expires_at`); spent ones are deleted by the idle sweep's pass.

    def count_in_window(self, key: str, expires_at: int) -> int:
        """Add one to the window's counter; returns the count including this one."""
        try:
            doc = self.db[SIGN_IN_LIMITS].find_one_and_update(
                {"_id": eq(key)},
                # $max, not $setOnInsert (which nx-27017 ignores): the same value for every count.
                {"$inc": {"count": 1}, "$max": {"expires_at": expires_at}},
                projection={"count": 1},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:  # two first counts at once: the other one created it
            return self.count_in_window(key, expires_at)
        return int(doc["count"])

    def window_count(self, key: str) -> int:
        doc = self.db[SIGN_IN_LIMITS].find_one({"_id": eq(key)}, {"count": 1})
        return int(doc["count"]) if doc else 0

    def delete_spent_windows(self, now: int) -> int:
        return self.db[SIGN_IN_LIMITS].delete_many({"expires_at": {"$lte": now}}).deleted_count
