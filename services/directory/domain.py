"""The directory's rules, free of storage and transport.

Agencies, their staff, teams and portal patients; which names, roles and
passwords are acceptable; who has ePrescribing; who a message addressed to
people, teams or the whole agency actually reaches; and when repeated failed
sign-ins lock a username.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache

from services.kit.auth import ROLE_ADMIN, ROLE_STAFF, ROLES
from services.kit.errors import InvalidInput
from services.kit.npi import is_valid_npi, npi_check_digit  # noqa: F401 - directory's own names
from services.kit.validation import ID_PATTERN

STAFF_PREFIX = "stf"
TEAM_PREFIX = "team"
PATIENT_PREFIX = "pat"
SESSION_PREFIX = "ses"

MAX_IDS_PER_CALL = 1000
PASSWORD_MIN_LENGTH = 12
PASSWORD_MAX_LENGTH = 256
USERNAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._@-]{1,62}[a-z0-9]$")
PORTAL_CONSUMER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
EMAIL_PATTERN = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")
DEFAULT_PATIENT_SINGULAR = "Patient"
DEFAULT_PATIENT_PLURAL = "Patients"
# How long a compliance item may stay overdue before it is escalated: a day by default, from a
# minute (testing a workflow) to thirty days.
DEFAULT_COMPLIANCE_ESCALATION_MINUTES = 24 * 60
MIN_COMPLIANCE_ESCALATION_MINUTES = 1
MAX_COMPLIANCE_ESCALATION_MINUTES = 30 * 24 * 60
# ePrescribing vendors an agency may subscribe through ("" = none chosen yet).
ERX_VENDOR_DOSESPOT = "dosespot"
ERX_VENDORS = (ERX_VENDOR_DOSESPOT,)


def new_id(prefix: str) -> str:
    """`<prefix>_<random>`; always matches [A-Za-z0-9_-]{1,64}."""
    return f"{prefix}_{secrets.token_urlsafe(12)}"


def is_well_formed_id(value: str) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


DEFAULT_IDLE_SIGNOUT_MINUTES = 15
IDLE_SIGNOUT_MINUTES_RANGE = (1, 240)


@dataclass(frozen=True)
class Terminology:
    patient_singular: str = DEFAULT_PATIENT_SINGULAR
    patient_plural: str = DEFAULT_PATIENT_PLURAL


@dataclass(frozen=True)
class Agency:
    id: str
    name: str
    time_zone: str = "UTC"
    notify_linked_staff_on_schedule_change: bool = False
    terminology: Terminology = field(default_factory=Terminology)
    # Gateway consumer (Kong username) of the patient portal serving this agency; "" = no portal.
    portal_consumer: str = ""
    compliance_escalation_minutes: int = DEFAULT_COMPLIANCE_ESCALATION_MINUTES
    # Minutes without activity before the web page signs staff out (a warning comes first).
    idle_signout_minutes: int = DEFAULT_IDLE_SIGNOUT_MINUTES
    # Lab results also go to the provider who ordered them (ORU OBR-16 / ORC-12).
    notify_ordering_provider_of_results: bool = False
    # The agency subscribes to ePrescribing: without it none of its staff has ePrescribing.
    erx_subscription: bool = False
    # The ePrescribing vendor (one of ERX_VENDORS), "" = none.
    erx_vendor: str = ""
    # The practice's clinic id at the vendor, "" = none. Not a secret (the clinic key lives in erx-bridge).
    erx_clinic_id: str = ""


@dataclass(frozen=True)
class StaffMember:
    id: str
    agency_id: str
    username: str
    display_name: str
    email: str = ""
    roles: tuple[str, ...] = (ROLE_STAFF,)
    lab_result_notification: bool = False
    eprescribing_enabled: bool = False
    active: bool = True
    # Told when this member's compliance items stay overdue; "" = none (the compliance officers are).
    supervisor_id: str = ""
    # National Provider Identifier (10 digits), unique within the agency; "" = none.
    npi: str = ""
    # The prescriber's clinician id at the agency's ePrescribing vendor; "" = none.
    erx_clinician_id: str = ""

    @property
    def is_admin(self) -> bool:
        return ROLE_ADMIN in self.roles

    @property
    def counts_as_admin(self) -> bool:
        """Counted in the agency's active admins (at least one must remain)."""
        return self.active and self.is_admin


@dataclass(frozen=True)
class Team:
    id: str
    agency_id: str
    name: str
    member_ids: tuple[str, ...] = ()


def patient_sort_key(created_at_ms: int, patient_id: str) -> str:
    """Portal patients are listed newest first by this key; same-millisecond ties by id."""
    return f"{created_at_ms:015d}.{patient_id}"


def is_patient_cursor(value: str) -> bool:
    """Is `value` shaped like a patient_sort_key (a page cursor handed out earlier)?"""
    stamp, dot, patient_id = value.partition(".")
    return bool(dot) and len(stamp) == 15 and stamp.isascii() and stamp.isdigit() and is_well_formed_id(patient_id)


@dataclass(frozen=True)
class PortalPatient:
    """A patient's identity in the patient portal. The display name is PHI."""

    id: str
    agency_id: str
    portal_user_id: str
    display_name: str
    created_at: int = 0


# --- names, roles, passwords -------------------------------------------------------------------


def username_key(raw: str) -> str:
    """Usernames are unique regardless of case: stored and looked up lowercased."""
    return raw.strip().lower()


def check_new_username(raw: str) -> str:
    username = username_key(raw)
    if not USERNAME_PATTERN.fullmatch(username):
        raise InvalidInput(
            "invalid_username",
            "username must be 3-64 characters: letters, digits, '.', '_', '-' or '@', "
            "starting and ending with a letter or digit",
            {"field": "username"},
        )
    return username


def normalize_roles(roles: Iterable[str]) -> tuple[str, ...]:
    """Known roles only, in canonical order; every staff member holds `staff`."""
    wanted = set(roles)
    unknown = sorted(wanted - set(ROLES))
    if unknown:
        raise InvalidInput("unknown_role", f"unknown role: {unknown[0]}", {"field": "roles", "allowed": list(ROLES)})
    wanted.add(ROLE_STAFF)
    return tuple(role for role in ROLES if role in wanted)


def check_password(password: str, username: str) -> str:
    if len(password) < PASSWORD_MIN_LENGTH:
        raise InvalidInput(
            "weak_password", f"password must be at least {PASSWORD_MIN_LENGTH} characters", {"field": "password"}
        )
    if len(password) > PASSWORD_MAX_LENGTH:
        raise InvalidInput(
            "weak_password", f"password must be at most {PASSWORD_MAX_LENGTH} characters", {"field": "password"}
        )
    if password.strip().lower() == username_key(username):
        raise InvalidInput("weak_password", "password must not be the username", {"field": "password"})
    return password


def check_email(email: str) -> str:
    email = email.strip()
    if email and not EMAIL_PATTERN.fullmatch(email):
        raise InvalidInput("invalid_email", "email is not a valid address", {"field": "email"})
    return email


def check_npi(raw: str) -> str:
    """A staff member's NPI as an admin typed it: "" for none, else ten digits with a valid check digit."""
    npi = raw.strip()
    if npi and not is_valid_npi(npi):
        raise InvalidInput(
            "invalid_npi",
            "npi must be a 10-digit National Provider Identifier whose last digit is its check digit",
            {"field": "npi"},
        )
    return npi


def _check_erx_id(raw: str, name: str, field_path: str) -> str:
    """A vendor-side id (clinician, clinic): "" for none, else [A-Za-z0-9_-]{1,64}; 400 `invalid_<name>`."""
    value = raw.strip()
    if value and not ID_PATTERN.fullmatch(value):
        raise InvalidInput(
            f"invalid_{name}",
            f"{name} must be 1-64 letters, digits, '_' or '-' (or empty for none)",
            {"field": field_path},
        )
    return value


def check_erx_clinician_id(raw: str) -> str:
    """A prescriber's clinician id at the ePrescribing vendor: "" for none, else [A-Za-z0-9_-]{1,64}."""
    return _check_erx_id(raw, "erx_clinician_id", "erx_clinician_id")


def check_erx_clinic_id(raw: str) -> str:
    """The practice's clinic id at the ePrescribing vendor: "" for none, else [A-Za-z0-9_-]{1,64}."""
    return _check_erx_id(raw, "erx_clinic_id", "options.erx_clinic_id")


def check_erx_vendor(raw: str) -> str:
    """An ePrescribing vendor: "" for none, else one of ERX_VENDORS (only "dosespot" today)."""
    vendor = raw.strip()
    if vendor and vendor not in ERX_VENDORS:
        raise InvalidInput(
            "invalid_erx_vendor",
            f"erx_vendor must be one of: {', '.join(ERX_VENDORS)} (or empty for none)",
            {"field": "options.erx_vendor", "allowed": list(ERX_VENDORS)},
        )
    return vendor


def has_eprescribing(member: StaffMember, agency: Agency | None) -> bool:
    """Does the member have ePrescribing? Only an active member flagged for it (`eprescribing_enabled`,
    set by an admin) of an agency that subscribes (`erx_subscription`): the flag alone, in an agency
    without a subscription (or that stopped subscribing), gives nothing. What every view and answer
    calls `eprescribing_enabled`; the stored flag itself is shown to admins only."""
    return bool(
        agency is not None
        and agency.id == member.agency_id
        and agency.erx_subscription
        and member.eprescribing_enabled
        and member.active
    )


def check_supervisor(member_id: str, supervisor: StaffMember | None, wanted: str) -> str:
    """`wanted` as a member's supervisor: "" for none, else an active staff member of the member's
    agency other than the member (`supervisor` is that id looked up in the agency, None if absent).

    Only one hop is ever followed (escalation tells the supervisor, not the supervisor's supervisor),
    so a loop between two members is harmless and not refused.
    """
    if not wanted:
        return ""
    if wanted == member_id:
        raise InvalidInput("invalid_supervisor", "a staff member cannot supervise themself", {"field": "supervisor_id"})
    if supervisor is None or not supervisor.active:
        raise InvalidInput(
            "invalid_supervisor",
            "supervisor_id must be an active staff member of the agency",
            {"field": "supervisor_id"},
        )
    return wanted


def check_portal_consumer(raw: str) -> str:
    """A gateway consumer name (Kong username), or "" for an agency without a patient portal."""
    consumer = raw.strip()
    if consumer and not PORTAL_CONSUMER_PATTERN.fullmatch(consumer):
        raise InvalidInput(
            "invalid_portal_consumer",
            "portal_consumer must be a gateway consumer name: letters, digits, '.', '_', '-' or '@'",
            {"field": "options.portal_consumer"},
        )
    return consumer


@cache
def _time_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def check_time_zone(name: str) -> str:
    if name not in _time_zones():
        raise InvalidInput("invalid_time_zone", "time_zone must be an IANA name such as America/Chicago")
    return name


def team_name_key(name: str) -> str:
    """Team names are unique within an agency regardless of case and surrounding spaces."""
    return " ".join(name.split()).casefold()


def session_end_reason(before: StaffMember, after: StaffMember, password_changed: bool) -> str | None:
    """Why a change to a staff member ends their sessions, or None when they may go on.

    Tokens carry the roles, and every service trusts them: a member who loses a role (an admin
    demoted, a prescriber no longer one) must sign in again to get tokens without it. A role
    added takes effect at the next refresh, so nothing needs to end for that.
    """
    if password_changed:
        return "password_reset"
    if before.active and not after.active:
        return "staff_deactivated"
    if not set(before.roles) <= set(after.roles):
        return "roles_changed"
    return None


# --- recipients ---------------------------------------------------------------------------------


def distinct_ids(ids: Iterable[str], what: str = "ids") -> list[str]:
    unique = list(dict.fromkeys(ids))
    if len(unique) > MAX_IDS_PER_CALL:
        raise InvalidInput("too_many_ids", f"at most {MAX_IDS_PER_CALL} {what} per call")
    return unique


@dataclass(frozen=True)
class Resolution:
    staff_ids: list[str]
    missing_staff_ids: list[str]
    missing_team_ids: list[str]


def resolve_recipients(
    staff: Mapping[str, StaffMember],
    teams: Mapping[str, Team],
    staff_ids: Iterable[str],
    team_ids: Iterable[str],
    whole_agency: bool,
) -> Resolution:
    """Who a message reaches: distinct active staff, sorted by id so the answer is stable.

    `staff` and `teams` hold what exists in the caller's agency; anything asked for
    that is not there (unknown, or another agency's) is reported as missing.
    Deactivated staff are known but never reached.
    """
    wanted: set[str] = set()
    missing_staff = []
    for staff_id in dict.fromkeys(staff_ids):
        if staff_id in staff:
            wanted.add(staff_id)
        else:
            missing_staff.append(staff_id)
    missing_teams = []
    for team_id in dict.fromkeys(team_ids):
        team = teams.get(team_id)
        if team is None:
            missing_teams.append(team_id)
        else:
            wanted.update(member for member in team.member_ids if member in staff)
    if whole_agency:
        wanted.update(staff)
    reached = sorted(staff_id for staff_id in wanted if staff[staff_id].active)
    return Resolution(reached, missing_staff, missing_teams)


def team_ids_by_member(teams: Iterable[Team]) -> dict[str, list[str]]:
    """Which teams each member is in, team ids sorted."""
    by_member: dict[str, list[str]] = {}
    for team in sorted(teams, key=lambda t: t.id):
        for member in team.member_ids:
            by_member.setdefault(member, []).append(team.id)
    return by_member


# --- failed sign-ins ----------------------------------------------------------------------------


def login_attempt_key(secret: bytes, raw_username: str) -> str:
    """The id failed sign-ins are counted under: a keyed hash of the normalized username.

    What was typed as a username (often a password typed into the wrong field) is never stored,
    and without the key the ids cannot be tested against guessed usernames.
    """
    return hmac.new(secret, username_key(raw_username).encode("utf-8"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class LoginAttempts:
    """The lock on one username after too many failed sign-ins (epoch ms; 0 = not locked)."""

    locked_until: int = 0


def is_locked_out(attempts: LoginAttempts | None, now_ms: int) -> bool:
    return attempts is not None and attempts.locked_until > now_ms


def lock_reached(failures: int, max_failures: int) -> bool:
    return failures >= max_failures


def retry_after_s(attempts: LoginAttempts, now_ms: int) -> int:
    return max(1, -(-(attempts.locked_until - now_ms) // 1000))


# --- cloud addresses: Direct addresses and fax numbers linked to staff -----------------------------

CLOUD_ADDRESS_PREFIX = "cad"
CLOUD_KIND_DIRECT = "direct"
CLOUD_KIND_FAX = "fax"
CLOUD_KINDS = (CLOUD_KIND_DIRECT, CLOUD_KIND_FAX)
MAX_CLOUD_ADDRESS_STAFF = 100
# RFC 5321/5322 addr-spec, dot-atom form only (no quoted local parts, no address literals): the
# local part's atext, then a domain of at least two LDH labels (each 1-63, no leading/trailing '-').
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DIRECT_ADDRESS_PATTERN = re.compile(rf"^{_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})+$")
E164_PATTERN = re.compile(r"^\+[1-9][0-9]{6,14}$")
# What people type between the digits of a fax number; dropped before the E.164 check.
_FAX_PUNCTUATION = str.maketrans("", "", " -.()\u00a0")


@dataclass(frozen=True)
class CloudAddress:
    """A Direct address or fax number of an agency, and the staff who receive what arrives at it
    (a shared address: each of them; a personal one: the one)."""

    id: str
    agency_id: str
    kind: str
    address: str
    label: str = ""
    staff_ids: tuple[str, ...] = ()


def check_cloud_kind(raw: str) -> str:
    if raw not in CLOUD_KINDS:
        raise InvalidInput(
            "invalid_kind", "kind must be 'direct' or 'fax'", {"field": "kind", "allowed": list(CLOUD_KINDS)}
        )
    return raw


def normalize_cloud_address(kind: str, raw: str) -> str | None:
    """The stored form of an address of this kind (Direct: lowercased addr-spec; fax: E.164), or None
    when it is not one."""
    text = raw.strip()
    if kind == CLOUD_KIND_DIRECT:
        local, _, domain_part = text.rpartition("@")
        if len(text) > 254 or len(local) > 64 or len(domain_part) > 253:
            return None
        return text.lower() if DIRECT_ADDRESS_PATTERN.fullmatch(text) else None
    if kind == CLOUD_KIND_FAX:
        number = text.translate(_FAX_PUNCTUATION)
        return number if E164_PATTERN.fullmatch(number) else None
    return None


def check_cloud_address(kind: str, raw: str) -> str:
    address = normalize_cloud_address(kind, raw)
    if address is None:
        what = "a Direct address (name@domain)" if kind == CLOUD_KIND_DIRECT else "an E.164 number (+15555550100)"
        raise InvalidInput("invalid_address", f"address must be {what}", {"field": "address"})
    return address
