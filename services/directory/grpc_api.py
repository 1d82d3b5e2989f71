"""gRPC face of the directory for the other services.

The kit's interceptor has verified the bearer token (with the directory's own
keys, and against the sessions store for revocation) before a handler runs;
every answer is scoped to that token's agency. Ids that do not exist there,
including other agencies' ids, come back in the missing_* lists rather than as
an error: the caller decides what that means. GetPortalPatient asks for one
record, so an unknown (or another agency's) patient is NOT_FOUND.

A staff member's `eprescribing_enabled` is whether they have ePrescribing
(domain.has_eprescribing: flagged, active, and their agency subscribes), never
the bare flag: every service may trust it as it stands.

Three methods are of another kind: IssueServiceToken is open (client
credentials, no bearer token), ListRevokedSessions answers platform-scope
service tokens only, and ResolveCloudAddress answers only the platform-scope
token of the `cloud-comms` service client (an inbound Direct message or fax
names an address, not an agency: the address says which agency it is for); a
platform-scope token, in turn, is refused by every agency-scoped method.

Role rules are those of each method's HTTP twin (docs/audit-coverage.md lists
them): GetPortalPatient, like GET /api/v1/directory/patients/<id>, answers
admins, and the service that serves the patient portal (inbox); any other staff
member or service is PERMISSION_DENIED `admin_only`. A staff record's vendor
clinician id is shown to admins and services, and to the staff member
themself (erx-bridge signs a prescriber in with it on their own token); the
agency's portal consumer to admins and services. Every GetPortalPatient leaves
a `phi.accessed.v1` record (allowed, or denied for a refusal or an unknown
patient), and every refusal an `access_refused` security event.
"""

from __future__ import annotations

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from services.directory import domain, events
from services.directory.domain import Agency, StaffMember
from services.directory.service_clients import ServiceClients
from services.directory.store import DirectoryStore
from services.kit.auth import (
    KIND_SERVICE,
    ROLE_ADMIN,
    ROLE_COMPLIANCE_OFFICER,
    ROLE_PRESCRIBER,
    ROLE_STAFF,
    SERVICE_SUBJECT_PREFIX,
    Identity,
    agency_caller,
    platform_caller,
)
from services.kit.errors import Forbidden, InvalidInput, NotFound
from services.kit.grpc_server import ServiceBinding
from services.kit.mongo import now_ms
from services.kit.revocations import BOOTSTRAP_WINDOW_MS, LIST_PAGE_LIMIT
from services.kit.security_events import SecurityLog, grpc_refusals_recorded

ROLE_TO_PROTO = {
    ROLE_STAFF: directory_pb2.ROLE_STAFF,
    ROLE_ADMIN: directory_pb2.ROLE_ADMIN,
    ROLE_COMPLIANCE_OFFICER: directory_pb2.ROLE_COMPLIANCE_OFFICER,
    ROLE_PRESCRIBER: directory_pb2.ROLE_PRESCRIBER,
}
PROTO_TO_ROLE = {number: role for role, number in ROLE_TO_PROTO.items()}
SERVICE_NAME = directory_pb2.DESCRIPTOR.services_by_name["DirectoryService"].full_name
OPEN_METHODS = frozenset({f"/{SERVICE_NAME}/IssueServiceToken"})
# The one service client that may resolve cloud addresses (with a platform-scope token).
CLOUD_COMMS_CLIENT = "cloud-comms"
# The service clients that read portal patients (inbox serves the patient portal's requests).
PORTAL_PATIENT_CLIENTS = frozenset({"inbox"})


def is_service(caller: Identity) -> bool:
    return caller.kind == KIND_SERVICE


def sees_admin_fields(caller: Identity) -> bool:
    """What the HTTP edge shows admins only (a partner integration's name, vendor ids) is for admins
    and services here too."""
    return is_service(caller) or caller.is_admin


def may_read_portal_patients(caller: Identity) -> bool:
    """Admins (as on GET /api/v1/directory/patients), and the services that serve the portal."""
    if is_service(caller):
        return caller.subject.removeprefix(SERVICE_SUBJECT_PREFIX) in PORTAL_PATIENT_CLIENTS
    return caller.is_admin


refusals_recorded = grpc_refusals_recorded(SERVICE_NAME)


def staff_message(
    member: StaffMember, team_ids: list[str], agency: Agency | None, *, admin_fields: bool = True
) -> directory_pb2.Staff:
    """A staff member for another service; `agency` is the member's (None if unknown: no ePrescribing).
    Without `admin_fields` the vendor clinician id is left out (GET /api/v1/directory/staff shows it
    to admins only)."""
    return directory_pb2.Staff(
        staff_id=member.id,
        agency_id=member.agency_id,
        display_name=member.display_name,
        email=member.email,
        roles=[ROLE_TO_PROTO[role] for role in member.roles if role in ROLE_TO_PROTO],
        lab_result_notification=member.lab_result_notification,
        eprescribing_enabled=domain.has_eprescribing(member, agency),
        active=member.active,
        team_ids=team_ids,
        supervisor_id=member.supervisor_id,
        npi=member.npi,
        erx_clinician_id=member.erx_clinician_id if admin_fields else "",
    )


class DirectoryServicer(directory_pb2_grpc.DirectoryServiceServicer):
    def __init__(self, store: DirectoryStore, service_clients: ServiceClients, security: SecurityLog | None = None):
        self.store = store
        self.service_clients = service_clients
        self.security = security

    @refusals_recorded
    def GetStaff(self, request: directory_pb2.GetStaffRequest, context) -> directory_pb2.GetStaffResponse:
        caller = agency_caller()
        agency_id = caller.agency_id
        staff_ids = domain.distinct_ids(request.staff_ids, "staff ids")
        found = self.store.staff_by_ids(agency_id, [i for i in staff_ids if domain.is_well_formed_id(i)])
        teams_of = self.store.team_ids_of(agency_id, found) if found else {}
        agency = self.store.get_agency(agency_id) if found else None
        full = sees_admin_fields(caller)
        return directory_pb2.GetStaffResponse(
            staff=[
                staff_message(found[i], teams_of[i], agency, admin_fields=full or i == caller.subject)
                for i in staff_ids
                if i in found
            ],
            missing_staff_ids=[i for i in staff_ids if i not in found],
        )

    @refusals_recorded
    def ResolveRecipients(
        self, request: directory_pb2.ResolveRecipientsRequest, context
    ) -> directory_pb2.ResolveRecipientsResponse:
        agency_id = agency_caller().agency_id
        staff_ids = domain.distinct_ids(request.staff_ids, "staff ids")
        team_ids = domain.distinct_ids(request.team_ids, "team ids")
        npis = domain.distinct_ids(request.npis, "NPIs")
        domain.distinct_ids([*staff_ids, *team_ids, *npis], "staff ids, team ids and NPIs")
        teams = {team.id: team for team in self.store.list_teams(agency_id)} if team_ids else {}
        by_npi = self.store.staff_by_npis(agency_id, [n for n in npis if domain.is_valid_npi(n)]) if npis else {}
        if request.whole_agency:
            staff = {member.id: member for member in self.store.list_staff(agency_id)}
        else:
            wanted = set(staff_ids)
            for team_id in team_ids:
                if team_id in teams:
                    wanted.update(teams[team_id].member_ids)
            wanted.difference_update(member.id for member in by_npi.values())
            staff = self.store.staff_by_ids(agency_id, sorted(i for i in wanted if domain.is_well_formed_id(i)))
        staff.update({member.id: member for member in by_npi.values()})
        named = [*staff_ids, *(member.id for member in by_npi.values())]
        resolution = domain.resolve_recipients(staff, teams, named, team_ids, request.whole_agency)
        return directory_pb2.ResolveRecipientsResponse(
            staff_ids=resolution.staff_ids,
            missing_staff_ids=resolution.missing_staff_ids,
            missing_team_ids=resolution.missing_team_ids,
            missing_npis=[n for n in npis if n not in by_npi],
            team_names={team_id: teams[team_id].name for team_id in team_ids if team_id in teams},
        )

    @refusals_recorded
    def GetAgencySettings(
        self, request: directory_pb2.GetAgencySettingsRequest, context
    ) -> directory_pb2.GetAgencySettingsResponse:
        caller = agency_caller()
        agency = self.store.get_agency(caller.agency_id)
        if agency is None:
            raise NotFound("agency_not_found", "the caller's agency is not in the directory")
        return directory_pb2.GetAgencySettingsResponse(
            agency_id=agency.id,
            name=agency.name,
            notify_linked_staff_on_schedule_change=agency.notify_linked_staff_on_schedule_change,
            terminology=directory_pb2.Terminology(
                patient_singular=agency.terminology.patient_singular,
                patient_plural=agency.terminology.patient_plural,
            ),
            time_zone=agency.time_zone,
            portal_consumer=agency.portal_consumer if sees_admin_fields(caller) else "",
            compliance_escalation_minutes=agency.compliance_escalation_minutes,
            idle_signout_minutes=agency.idle_signout_minutes,
            notify_ordering_provider_of_results=agency.notify_ordering_provider_of_results,
            erx_subscription=agency.erx_subscription,
            erx_vendor=agency.erx_vendor,
            erx_clinic_id=agency.erx_clinic_id,
        )

    @refusals_recorded
    def ListStaff(self, request: directory_pb2.ListStaffRequest, context) -> directory_pb2.ListStaffResponse:
        caller = agency_caller()
        agency_id = caller.agency_id
        role = PROTO_TO_ROLE.get(request.role) if request.role else None
        if request.role and role is None:
            raise InvalidInput("unknown_role", "unknown role")
        agency = self.store.get_agency(agency_id)
        chosen = [
            member
            for member in self.store.list_staff(agency_id)
            if member.active
            and (role is None or role in member.roles)
            and (member.lab_result_notification or not request.lab_result_notification_only)
            and (domain.has_eprescribing(member, agency) or not request.eprescribing_only)
        ]
        full = sees_admin_fields(caller)
        return directory_pb2.ListStaffResponse(
            staff=[
                staff_message(member, [], agency, admin_fields=full or member.id == caller.subject)
                for member in sorted(chosen, key=lambda m: m.id)
            ]
        )

    @refusals_recorded
    def GetPortalPatient(
        self, request: directory_pb2.GetPortalPatientRequest, context
    ) -> directory_pb2.GetPortalPatientResponse:
        caller = agency_caller()
        agency_id = caller.agency_id
        if bool(request.patient_id) == bool(request.portal_user_id):
            raise InvalidInput("invalid_request", "give exactly one of patient_id and portal_user_id")
        wanted = request.patient_id or request.portal_user_id
        if not may_read_portal_patients(caller):
            self._refused_patient(caller, request)
            raise Forbidden("admin_only", "reading portal patients needs the admin role")
        patient = None
        if domain.is_well_formed_id(wanted):
            if request.patient_id:
                patient = self.store.get_patient(agency_id, wanted)
            else:
                patient = self.store.patient_by_portal_user(agency_id, wanted)
        if patient is None:
            self._refused_patient(caller, request)
            raise NotFound("patient_not_found", "no such patient in the caller's agency")
        self.store.record_patient_access(caller, [patient.id])
        return directory_pb2.GetPortalPatientResponse(
            patient_id=patient.id,
            agency_id=patient.agency_id,
            portal_user_id=patient.portal_user_id,
            display_name=patient.display_name,
        )

    def _refused_patient(self, caller: Identity, request: directory_pb2.GetPortalPatientRequest) -> None:
        """A denied record of the patient (or portal user) asked for; an id that is not well formed
        is recorded as "" (free text never goes into the audit trail)."""
        wanted = request.patient_id or request.portal_user_id
        asked = wanted if domain.is_well_formed_id(wanted) else ""
        if request.patient_id:
            self.store.record_patient_access(caller, [asked], outcome="denied")
        else:
            self.store.record_patient_access(caller, [], outcome="denied", portal_user_id=asked)

    @refusals_recorded
    def IssueServiceToken(
        self, request: directory_pb2.IssueServiceTokenRequest, context
    ) -> directory_pb2.IssueServiceTokenResponse:
        access = self.service_clients.issue(request.client_id, request.client_secret, request.agency_id)
        return directory_pb2.IssueServiceTokenResponse(access_token=access.token, expires_in=access.expires_in)

    @refusals_recorded
    def ListRevokedSessions(
        self, request: directory_pb2.ListRevokedSessionsRequest, context
    ) -> directory_pb2.ListRevokedSessionsResponse:
        platform_caller()
        since = max(request.since_ms, now_ms() - BOOTSTRAP_WINDOW_MS)
        docs = self.store.revoked_sessions_since(since, LIST_PAGE_LIMIT)
        return directory_pb2.ListRevokedSessionsResponse(
            sessions=[
                events.session_revoked_message(doc, doc.get("revoked_reason", ""), int(doc["revoked_at"]))
                for doc in docs
            ]
        )

    @refusals_recorded
    def ResolveCloudAddress(
        self, request: directory_pb2.ResolveCloudAddressRequest, context
    ) -> directory_pb2.ResolveCloudAddressResponse:
        self._cloud_comms_only()
        kind = domain.check_cloud_kind(request.kind)
        address = domain.normalize_cloud_address(kind, request.address)
        linked = self.store.find_cloud_address(kind, address) if address else None
        if linked is None:
            return directory_pb2.ResolveCloudAddressResponse(found=False)
        staff = self.store.staff_by_ids(linked.agency_id, list(linked.staff_ids))
        return directory_pb2.ResolveCloudAddressResponse(
            found=True,
            agency_id=linked.agency_id,
            address_id=linked.id,
            staff_ids=[i for i in linked.staff_ids if i in staff and staff[i].active],
            label=linked.label,
        )

    @refusals_recorded
    def ListLinkedCloudAddresses(
        self, request: directory_pb2.ListLinkedCloudAddressesRequest, context
    ) -> directory_pb2.ListLinkedCloudAddressesResponse:
        self._cloud_comms_only()
        kind = domain.check_cloud_kind(request.kind)
        addresses = [
            a
            for a in self.store.list_cloud_addresses(request.agency_id)
            if a.kind == kind and request.staff_id in a.staff_ids
        ]
        staff = self.store.staff_by_ids(request.agency_id, [i for a in addresses for i in a.staff_ids])
        active = {i for i, member in staff.items() if member.active}
        if request.staff_id not in active:
            return directory_pb2.ListLinkedCloudAddressesResponse()
        return directory_pb2.ListLinkedCloudAddressesResponse(
            addresses=[
                directory_pb2.LinkedCloudAddress(
                    address=a.address,
                    address_id=a.id,
                    staff_ids=[i for i in a.staff_ids if i in active],
                    label=a.label,
                )
                for a in addresses
            ]
        )

    @staticmethod
    def _cloud_comms_only() -> None:
        caller = platform_caller()
        if caller.subject != f"{SERVICE_SUBJECT_PREFIX}{CLOUD_COMMS_CLIENT}":
            raise Forbidden("cloud_comms_only", "only the cloud-comms service resolves cloud addresses")


def binding(store: DirectoryStore, service_clients: ServiceClients) -> ServiceBinding:
    """The servicer, recording its refusals in the directory's security outbox (relayed like every
    service's, services.kit.security_events)."""
    return ServiceBinding(
        add=directory_pb2_grpc.add_DirectoryServiceServicer_to_server,
        servicer=DirectoryServicer(store, service_clients, SecurityLog(store.db, service="directory")),
        full_name=SERVICE_NAME,
    )
