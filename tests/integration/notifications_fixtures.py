"""Notifications features assembled in-process against the real database, for integration tests.

Assembled by the service's own `build()`, as the process does, with two dependencies swapped:
directory's answers come from a small table (`DirectoryTable`), as inbox's integration tests do,
while the end-to-end tests run the real one; service identities are plain Identity values (no
token is needed: nothing here calls another process). No feature is attached: each test attaches
the one it exercises.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field

from clinic.directory.v1 import directory_pb2
from clinic.events.v1.envelope_pb2 import Envelope
from clinic.inbox.v1 import inbox_pb2
from services.kit.auth import Identity, current_identity
from services.kit.errors import NotFound
from services.kit.events import unpack
from services.notifications import config
from services.notifications.components import Components
from services.notifications.directory_client import split_provider_refs
from services.notifications.service import build

ROLES = {
    "staff": directory_pb2.ROLE_STAFF,
    "admin": directory_pb2.ROLE_ADMIN,
    "compliance_officer": directory_pb2.ROLE_COMPLIANCE_OFFICER,
}


@dataclass
class Member:
    agency_id: str
    name: str
    roles: tuple[str, ...] = ("staff",)
    supervisor_id: str = ""
    active: bool = True
    npi: str = ""


@dataclass
class DirectoryTable:
    """What directory would answer for the agencies of one test."""

    staff: dict[str, Member] = field(default_factory=dict)
    teams: dict[str, list[str]] = field(default_factory=dict)  # team id -> staff ids
    notify_linked_staff: dict[str, bool] = field(default_factory=dict)  # agency -> option
    escalation_minutes: dict[str, int] = field(default_factory=dict)
    notify_ordering_provider: dict[str, bool] = field(default_factory=dict)  # agency -> option (default off)
    # Agencies directory cannot answer for (NOT_FOUND), as after an agency is removed.
    unknown_agencies: set[str] = field(default_factory=set)
    calls: int = 0

    def _agency(self) -> str:
        identity = current_identity.get()
        assert identity is not None, "directory called without an identity"
        return identity.agency_id

    def agency_settings(self, agency_id: str) -> directory_pb2.GetAgencySettingsResponse:
        assert agency_id == self._agency()
        if agency_id in self.unknown_agencies:
            raise NotFound("agency_not_found", "the caller's agency is not in the directory")
        return directory_pb2.GetAgencySettingsResponse(
            agency_id=agency_id,
            notify_linked_staff_on_schedule_change=self.notify_linked_staff.get(agency_id, True),
            time_zone="America/Chicago",
            terminology=directory_pb2.Terminology(patient_singular="Client", patient_plural="Clients"),
            compliance_escalation_minutes=self.escalation_minutes.get(agency_id, 60),
            notify_ordering_provider_of_results=self.notify_ordering_provider.get(agency_id, False),
        )

    def resolve(
        self, staff_ids: list[str], team_ids: list[str], npis: list[str] | tuple[str, ...] = ()
    ) -> directory_pb2.ResolveRecipientsResponse:
        self.calls += 1
        agency = self._agency()
        mine = {s for s, m in self.staff.items() if m.agency_id == agency}
        by_npi = {self.staff[s].npi: s for s in mine if self.staff[s].npi}
        ids = [s for s in staff_ids if s in mine] + [by_npi[n] for n in npis if n in by_npi]
        for team in team_ids:
            ids += [s for s in self.teams.get(team, []) if s in mine]
        return directory_pb2.ResolveRecipientsResponse(
            staff_ids=sorted({s for s in ids if self.staff[s].active}),
            missing_staff_ids=[s for s in staff_ids if s not in mine],
            missing_team_ids=[t for t in team_ids if t not in self.teams],
            missing_npis=[n for n in npis if n not in by_npi],
        )

    def staff_message(self, staff_id: str) -> directory_pb2.Staff:
        member = self.staff[staff_id]
        return directory_pb2.Staff(
            staff_id=staff_id,
            agency_id=member.agency_id,
            display_name=member.name,
            roles=[ROLES[r] for r in member.roles],
            active=member.active,
            supervisor_id=member.supervisor_id,
            npi=member.npi,
        )

    def staff_records(self, staff_ids: list[str]) -> list[directory_pb2.Staff]:
        agency = self._agency()
        return [self.staff_message(s) for s in staff_ids if s in self.staff and self.staff[s].agency_id == agency]

    def list_staff(self, role: str) -> list[str]:
        agency = self._agency()
        return sorted(s for s, m in self.staff.items() if m.agency_id == agency and m.active and role in m.roles)


class DirectoryStandIn:
    """The DirectoryClient methods the features call, answered from a DirectoryTable."""

    def __init__(self, table: DirectoryTable):
        self.table = table

    def agency_settings(self, agency_id):
        return self.table.agency_settings(agency_id)

    def resolve(self, staff_ids, team_ids, npis=()):
        return self.table.resolve(staff_ids, team_ids, npis)

    def staff_ids_for_providers(self, refs):
        staff_ids, npis = split_provider_refs(refs)
        if not staff_ids and not npis:
            return []
        return list(self.table.resolve(staff_ids, [], npis).staff_ids)

    def staff(self, staff_ids):
        return self.table.staff_records(staff_ids)

    def list_staff(self, role):
        return self.table.list_staff(role)


class ServiceIdentities:
    def identity(self, agency_id: str = "") -> Identity:
        return Identity(subject="svc:notifications", agency_id=agency_id, roles=frozenset({"service"}), kind="service")


def make_components(db, table: DirectoryTable) -> Components:
    master = base64.b64encode(os.urandom(32)).decode()
    settings = config.load(
        {"MONGO_URI": "mongodb://unused:1", "PHI_MASTER_KEYS": f"m:{master}", "AMQP_URL": "amqp://unused/"}
    )
    return build(
        settings, db, directory=DirectoryStandIn(table), service_tokens=ServiceIdentities(), features=()
    ).components


def staged_deliveries(doc: dict) -> list[tuple[str, inbox_pb2.DeliverItemRequest]]:
    """(event id, request) of every delivery request a document carries in its outbox, oldest first."""
    found = []
    for event_id, entry in (doc.get("_outbox") or {}).items():
        envelope = Envelope()
        envelope.ParseFromString(entry["env"])
        assert envelope.event_type == "board_item.delivery_requested.v1"
        assert envelope.producer == "notifications"
        request = unpack(envelope, inbox_pb2.DeliverItemRequest)  # opens the sealed payload
        found.append((event_id, request))
    return found
