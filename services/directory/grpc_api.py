"""gRPC face of the directory for the other services.

The kit's interceptor has verified the bearer token (with the directory's own
keys) before a handler runs; every answer is scoped to that token's agency.
Ids that do not exist there, including other agencies' ids, come back in the
missing_* lists rather than as an error: the caller decides what that means.
"""

from __future__ import annotations

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from services.directory import domain
from services.directory.domain import StaffMember
from services.directory.store import DirectoryStore
from services.kit.auth import (
    ROLE_ADMIN,
    ROLE_COMPLIANCE_OFFICER,
    ROLE_PRESCRIBER,
    ROLE_STAFF,
    Identity,
    current_identity,
)
from services.kit.errors import Forbidden, NotFound, Unauthenticated
from services.kit.grpc_server import ServiceBinding

ROLE_TO_PROTO = {
    ROLE_STAFF: directory_pb2.ROLE_STAFF,
    ROLE_ADMIN: directory_pb2.ROLE_ADMIN,
    ROLE_COMPLIANCE_OFFICER: directory_pb2.ROLE_COMPLIANCE_OFFICER,
    ROLE_PRESCRIBER: directory_pb2.ROLE_PRESCRIBER,
}
CALLER_KINDS = ("staff", "service")


def caller() -> Identity:
    identity = current_identity.get()
    if identity is None:
        raise Unauthenticated("unauthenticated", "no caller identity")
    if identity.kind not in CALLER_KINDS:
        raise Forbidden("forbidden", "only staff and services may call the directory")
    return identity


def staff_message(member: StaffMember, team_ids: list[str]) -> directory_pb2.Staff:
    return directory_pb2.Staff(
        staff_id=member.id,
        agency_id=member.agency_id,
        display_name=member.display_name,
        email=member.email,
        roles=[ROLE_TO_PROTO[role] for role in member.roles if role in ROLE_TO_PROTO],
        lab_result_notification=member.lab_result_notification,
        eprescribing_enabled=member.eprescribing_enabled,
        active=member.active,
        team_ids=team_ids,
    )


class DirectoryServicer(directory_pb2_grpc.DirectoryServiceServicer):
    def __init__(self, store: DirectoryStore):
        self.store = store

    def GetStaff(self, request: directory_pb2.GetStaffRequest, context) -> directory_pb2.GetStaffResponse:
        agency_id = caller().agency_id
        staff_ids = domain.distinct_ids(request.staff_ids, "staff ids")
        found = self.store.staff_by_ids(agency_id, [i for i in staff_ids if domain.is_well_formed_id(i)])
        teams_of = domain.team_ids_by_member(self.store.list_teams(agency_id)) if found else {}
        return directory_pb2.GetStaffResponse(
            staff=[staff_message(found[i], teams_of.get(i, [])) for i in staff_ids if i in found],
            missing_staff_ids=[i for i in staff_ids if i not in found],
        )

    def ResolveRecipients(
        self, request: directory_pb2.ResolveRecipientsRequest, context
    ) -> directory_pb2.ResolveRecipientsResponse:
        agency_id = caller().agency_id
        staff_ids = domain.distinct_ids(request.staff_ids, "staff ids")
        team_ids = domain.distinct_ids(request.team_ids, "team ids")
        domain.distinct_ids([*staff_ids, *team_ids], "staff and team ids")
        teams = {team.id: team for team in self.store.list_teams(agency_id)} if team_ids else {}
        if request.whole_agency:
            staff = {member.id: member for member in self.store.list_staff(agency_id)}
        else:
            wanted = set(staff_ids)
            for team_id in team_ids:
                if team_id in teams:
                    wanted.update(teams[team_id].member_ids)
            staff = self.store.staff_by_ids(agency_id, sorted(i for i in wanted if domain.is_well_formed_id(i)))
        resolution = domain.resolve_recipients(staff, teams, staff_ids, team_ids, request.whole_agency)
        return directory_pb2.ResolveRecipientsResponse(
            staff_ids=resolution.staff_ids,
            missing_staff_ids=resolution.missing_staff_ids,
            missing_team_ids=resolution.missing_team_ids,
        )

    def GetAgencySettings(
        self, request: directory_pb2.GetAgencySettingsRequest, context
    ) -> directory_pb2.GetAgencySettingsResponse:
        agency = self.store.get_agency(caller().agency_id)
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
        )


def binding(store: DirectoryStore) -> ServiceBinding:
    return ServiceBinding(
        add=directory_pb2_grpc.add_DirectoryServiceServicer_to_server,
        servicer=DirectoryServicer(store),
        full_name=directory_pb2.DESCRIPTOR.services_by_name["DirectoryService"].full_name,
    )
