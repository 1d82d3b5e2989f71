"""Demo agencies, staff, teams, portal patients and cloud addresses for development.

Fixed ids so docs and tests can name them. Seeding only inserts what is absent,
so running it again changes nothing (not even records edited since). Every
demo login shares DEMO_PASSWORD, which is for development only: seeding is
refused in production mode.

A demo record seeded before a field existed gets that field's demo value the
next time seeding runs (BACKFILLED_*): only where its document lacks the field
altogether, which no save since can have left, so an edit is never undone.
Demo cloud addresses are added to a database seeded before they existed too,
each only while neither its id nor its address is stored (an admin may have
registered the address under an id of their own).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.directory.domain import (
    CLOUD_KIND_DIRECT,
    CLOUD_KIND_FAX,
    ERX_VENDOR_DOSESPOT,
    Agency,
    CloudAddress,
    PortalPatient,
    StaffMember,
    Team,
    Terminology,
)
from services.directory.passwords import PasswordHasher
from services.directory.store import DirectoryStore
from services.kit.auth import ROLE_ADMIN, ROLE_COMPLIANCE_OFFICER, ROLE_PRESCRIBER, ROLE_STAFF
from services.kit.errors import Conflict

DEMO_PASSWORD = "demo-Password-2026"  # development only  # noqa: S105
# The gateway consumer of the patient portal (gateway/kong.yml), serving both demo agencies.
PORTAL_CONSUMER = "patient-portal"

RIVERBEND = Agency(
    id="agy_riverbend",
    name="Riverbend Behavioral Health",
    time_zone="America/Chicago",
    notify_linked_staff_on_schedule_change=True,
    terminology=Terminology(patient_singular="Client", patient_plural="Clients"),
    portal_consumer=PORTAL_CONSUMER,
    compliance_escalation_minutes=4 * 60,
    idle_signout_minutes=15,
    # Riverbend subscribes to ePrescribing through DoseSpot (clinic id "1001", a demo value).
    erx_subscription=True,
    erx_vendor=ERX_VENDOR_DOSESPOT,
    erx_clinic_id="1001",
)
LAKESIDE = Agency(
    id="agy_lakeside", name="Lakeside Family Clinic", time_zone="America/New_York", portal_consumer=PORTAL_CONSUMER
)
AGENCIES = (RIVERBEND, LAKESIDE)

S = (ROLE_STAFF,)
ADMIN = (ROLE_STAFF, ROLE_ADMIN)
PRESCRIBER = (ROLE_STAFF, ROLE_PRESCRIBER)
COMPLIANCE = (ROLE_STAFF, ROLE_COMPLIANCE_OFFICER)


def _staff(
    agency: Agency,
    key: str,
    username: str,
    name: str,
    roles=S,
    *,
    lab=False,
    erx=False,
    active=True,
    supervisor="",
    npi="",
    erx_clinician="",
):
    return StaffMember(
        id=f"stf_{agency.id.removeprefix('agy_')}_{key}",
        agency_id=agency.id,
        username=username,
        display_name=name,
        email=f"{username.replace('.', '_')}@{agency.id.removeprefix('agy_')}.example",
        roles=roles,
        lab_result_notification=lab,
        eprescribing_enabled=erx,
        active=active,
        supervisor_id=f"stf_{agency.id.removeprefix('agy_')}_{supervisor}" if supervisor else "",
        npi=npi,
        erx_clinician_id=erx_clinician,
    )


def _prescriber(agency: Agency, key: str, username: str, name: str, *, npi: str, erx_clinician: str = ""):
    """A prescriber flagged for lab results and ePrescribing (which needs their agency's subscription too)."""
    return _staff(agency, key, username, name, PRESCRIBER, lab=True, erx=True, npi=npi, erx_clinician=erx_clinician)


R = RIVERBEND
# Supervisors: clinicians and case managers report to Dr. Hall, nurses to Dr. Reyes; front desk,
# intake and billing have none, so their overdue compliance items go to the compliance officer.
# Prescribers carry NPIs (valid check digits, not real providers') so SIU and ORU messages can name them.
# Riverbend's prescribers have ePrescribing with DoseSpot clinician ids (demo values); Lakeside's Dr. Ramirez
# is flagged for it too, but Lakeside does not subscribe, so he has none.
STAFF = (
    _staff(R, "admin", "admin", "Alex Morgan", ADMIN),
    _prescriber(R, "reyes", "dr.reyes", "Dr. Elena Reyes", npi="1234567893", erx_clinician="2001"),
    _staff(R, "kim", "nurse.kim", "Jordan Kim, RN", lab=True, supervisor="reyes"),
    _staff(R, "ortiz", "compliance.ortiz", "Sam Ortiz", COMPLIANCE),
    _prescriber(R, "chen", "dr.chen", "Dr. Wei Chen", npi="1498263056", erx_clinician="2002"),
    _prescriber(R, "brooks", "np.brooks", "Taylor Brooks, PMHNP", npi="1654321094", erx_clinician="2003"),
    _staff(R, "white", "nurse.white", "Rachel White, RN", lab=True, supervisor="reyes"),
    _staff(R, "patel", "therapist.patel", "Priya Patel, LCSW", supervisor="hall"),
    _staff(R, "nguyen", "therapist.nguyen", "Minh Nguyen, LPC", supervisor="hall"),
    _staff(R, "johnson", "therapist.johnson", "Marcus Johnson, LMFT", supervisor="hall"),
    _staff(R, "hall", "therapist.hall", "Jordan Hall, PsyD"),
    _staff(R, "garcia", "casemgr.garcia", "Lucia Garcia", supervisor="hall"),
    _staff(R, "oconnor", "casemgr.oconnor", "Sean O'Connor", supervisor="hall"),
    _staff(R, "martin", "peer.martin", "Riley Martin", supervisor="hall"),
    _staff(R, "wilson", "intake.wilson", "Chris Wilson"),
    _staff(R, "thompson", "intake.thompson", "Dana Thompson"),
    _staff(R, "davis", "frontdesk.davis", "Jamie Davis"),
    _staff(R, "lopez", "frontdesk.lopez", "Ana Lopez"),
    _staff(R, "lee", "billing.lee", "Morgan Lee"),
    _staff(R, "young", "former.young", "Casey Young", active=False),  # deactivated: never a recipient
    _staff(LAKESIDE, "admin", "lakeside.admin", "Pat Quinn", ADMIN),
    _prescriber(LAKESIDE, "ramirez", "dr.ramirez", "Dr. Luis Ramirez", npi="1987654328"),
    _staff(LAKESIDE, "foster", "nurse.foster", "Kelly Foster, RN", lab=True, supervisor="ramirez"),
    _staff(LAKESIDE, "baker", "frontdesk.baker", "Jesse Baker"),
)

TEAMS = (
    Team(
        "team_riverbend_intake",
        R.id,
        "Intake",
        (
            "stf_riverbend_wilson",
            "stf_riverbend_thompson",
            "stf_riverbend_davis",
            "stf_riverbend_lopez",
            "stf_riverbend_garcia",
        ),
    ),
    Team(
        "team_riverbend_outpatient",
        R.id,
        "Outpatient Therapy",
        (
            "stf_riverbend_patel",
            "stf_riverbend_nguyen",
            "stf_riverbend_johnson",
            "stf_riverbend_hall",
            "stf_riverbend_martin",
            "stf_riverbend_oconnor",
            "stf_riverbend_young",
        ),
    ),
    Team(
        "team_riverbend_medical",
        R.id,
        "Medical",
        (
            "stf_riverbend_reyes",
            "stf_riverbend_chen",
            "stf_riverbend_brooks",
            "stf_riverbend_kim",
            "stf_riverbend_white",
        ),
    ),
    Team("team_lakeside_clinical", LAKESIDE.id, "Clinical", ("stf_lakeside_ramirez", "stf_lakeside_foster")),
)

PATIENTS = (
    PortalPatient(
        id="pat_riverbend_demo",
        agency_id=R.id,
        portal_user_id="portal_riverbend_0001",
        display_name="Jane Demo-Client",
    ),
    PortalPatient(
        id="pat_lakeside_demo",
        agency_id=LAKESIDE.id,
        portal_user_id="portal_lakeside_0001",
        display_name="Lee Demo-Patient",
    ),
)

# Direct addresses and fax numbers (stored normalised). Riverbend's intake address and main fax are
# shared by the intake staff; Dr. Reyes has a personal Direct address; Lakeside's front desk one.
RIVERBEND_INTAKE_STAFF = ("stf_riverbend_wilson", "stf_riverbend_thompson")
CLOUD_ADDRESSES = (
    CloudAddress(
        "cad_riverbend_intake",
        R.id,
        CLOUD_KIND_DIRECT,
        "intake@direct.riverbend.example",
        "Intake",
        RIVERBEND_INTAKE_STAFF,
    ),
    CloudAddress("cad_riverbend_fax", R.id, CLOUD_KIND_FAX, "+15555550100", "Main fax", RIVERBEND_INTAKE_STAFF),
    CloudAddress(
        "cad_riverbend_reyes",
        R.id,
        CLOUD_KIND_DIRECT,
        "dr.reyes@direct.riverbend.example",
        "Dr. Elena Reyes",
        ("stf_riverbend_reyes",),
    ),
    CloudAddress(
        "cad_lakeside_frontdesk",
        LAKESIDE.id,
        CLOUD_KIND_DIRECT,
        "frontdesk@direct.lakeside.example",
        "Front desk",
        ("stf_lakeside_baker",),
    ),
)


# Fields added after demo data was first seeded: a demo record whose document lacks one gets the
# value it has here (see the module docstring).
BACKFILLED_AGENCY_FIELDS = ("erx_subscription", "erx_vendor", "erx_clinic_id")
BACKFILLED_STAFF_FIELDS = ("erx_clinician_id",)


@dataclass(frozen=True)
class SeedResult:
    created: int
    logins: list[dict]


def seed(store: DirectoryStore, hasher: PasswordHasher) -> SeedResult:
    """Insert whatever demo record is absent; leave existing ones untouched."""
    created = 0
    for agency in AGENCIES:
        if store.get_agency(agency.id) is None:
            created += _insert(lambda a=agency: store.create_agency(a), lambda a=agency: store.get_agency(a.id))
        store.fill_absent_agency_fields(agency.id, {name: getattr(agency, name) for name in BACKFILLED_AGENCY_FIELDS})
    password_hash = ""
    for member in STAFF:
        if store.get_staff(member.agency_id, member.id) is None:
            password_hash = password_hash or hasher.hash(DEMO_PASSWORD)  # one hash is enough for demo data
            created += _insert(
                lambda m=member, h=password_hash: store.create_staff(m, h),
                lambda m=member: store.get_staff(m.agency_id, m.id),
            )
        store.fill_absent_staff_fields(
            member.agency_id, member.id, {name: getattr(member, name) for name in BACKFILLED_STAFF_FIELDS}
        )
    for team in TEAMS:
        if store.get_team(team.agency_id, team.id) is None:
            created += _insert(lambda t=team: store.create_team(t), lambda t=team: store.get_team(t.agency_id, t.id))
    for patient in PATIENTS:
        if store.get_patient(patient.agency_id, patient.id) is None:
            created += _insert(
                lambda p=patient: store.create_patient(p), lambda p=patient: store.get_patient(p.agency_id, p.id)
            )
    for address in CLOUD_ADDRESSES:
        if (
            store.get_cloud_address(address.agency_id, address.id) is None
            and store.find_cloud_address(address.kind, address.address) is None
        ):
            created += _insert(
                lambda a=address: store.create_cloud_address(a),
                lambda a=address: store.find_cloud_address(a.kind, a.address),
            )
    return SeedResult(created=created, logins=demo_logins())


def _insert(create, find) -> int:
    try:
        create()
        return 1
    except Conflict:
        if find() is None:  # a clash with a non-demo record (e.g. the username is taken)
            raise
        return 0  # a concurrent seeding inserted it first


def demo_logins() -> list[dict]:
    names = {agency.id: agency.name for agency in AGENCIES}
    return [
        {
            "username": member.username,
            "password": DEMO_PASSWORD,
            "agency": names[member.agency_id],
            "agency_id": member.agency_id,
            "staff_id": member.id,
            "roles": list(member.roles),
        }
        for member in STAFF
        if member.active
    ]
