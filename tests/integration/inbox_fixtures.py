"""Inbox assembled in-process against the real database, for integration tests of its parts.

Assembled by the service's own `build()`, as the process does, with directory swapped: its answers
come from a small table (`AgencyTable`), while the end-to-end tests run the real one. No feature is
attached: each test attaches the ones it exercises. The `inbox` fixture is registered in
tests/integration/conftest.py.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field

import pytest

from services.inbox import config, domain
from services.inbox.components import Components
from services.inbox.directory_client import AgencySettings, PortalPatient, Resolution
from services.inbox.service import build
from services.kit.auth import Identity, current_identity
from services.kit.errors import NotFound

AMQP = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass
class AgencyTable:
    """What directory would answer for the agencies of one test."""

    teams: dict[str, list[str]] = field(default_factory=dict)  # team id -> staff ids
    staff: dict[str, str] = field(default_factory=dict)  # staff id -> agency id
    patients: dict[str, PortalPatient] = field(default_factory=dict)
    patient_term: str = "Patient"
    portal_consumer: str = "patient-portal"
    inactive: set[str] = field(default_factory=set)  # deactivated staff: known, never reached
    eprescribing: set[str] = field(default_factory=set)  # staff flagged for ePrescribing
    erx_agencies: set[str] = field(default_factory=set)  # agencies subscribing to ePrescribing

    def _agency(self) -> str:
        identity = current_identity.get()
        return identity.agency_id if identity else ""

    def resolve(self, addressing: domain.Addressing) -> Resolution:
        agency = self._agency()
        mine = [s for s, a in self.staff.items() if a == agency]
        missing_staff = [s for s in addressing.staff_ids if s not in mine]
        missing_teams = [t for t in addressing.team_ids if t not in self.teams]
        ids = [s for s in addressing.staff_ids if s in mine]
        for team in addressing.team_ids:
            ids += [s for s in self.teams.get(team, []) if s in mine]
        if addressing.whole_agency:
            ids += mine
        return Resolution([s for s in dict.fromkeys(ids) if s not in self.inactive], missing_staff, missing_teams)

    def eprescriber_ids(self) -> frozenset[str]:
        """As directory answers: active staff of the caller's agency flagged for ePrescribing, none
        unless the agency subscribes."""
        agency = self._agency()
        if agency not in self.erx_agencies:
            return frozenset()
        return frozenset(
            s for s, a in self.staff.items() if a == agency and s in self.eprescribing and s not in self.inactive
        )

    def agency_settings(self, agency_id: str) -> AgencySettings:
        return AgencySettings(
            agency_id, agency_id, self.patient_term, self.patient_term + "s", "UTC", self.portal_consumer
        )

    def portal_patient(self, *, patient_id: str = "", portal_user_id: str = "") -> PortalPatient:
        for patient in self.patients.values():
            if patient.agency_id == self._agency() and (
                patient.patient_id == patient_id or (portal_user_id and patient.portal_user_id == portal_user_id)
            ):
                return patient
        raise NotFound("patient_not_found", "no such patient")


def staff(agency_id: str, staff_id: str, *roles: str, name: str = "") -> Identity:
    return Identity(subject=staff_id, agency_id=agency_id, roles=frozenset(roles or ("staff",)), name=name or staff_id)


def make_inbox(db, table: AgencyTable | None = None) -> Components:
    master = base64.b64encode(os.urandom(32)).decode()
    settings = config.load({"MONGO_URI": "mongodb://unused:1", "PHI_MASTER_KEYS": f"m:{master}", "AMQP_URL": AMQP})
    return build(settings, db, directory=table or AgencyTable(), features=()).components


@pytest.fixture
def inbox(mongo_client, db_name):
    """(components, table): an inbox of this test's own database."""
    table = AgencyTable()
    return make_inbox(mongo_client[db_name], table), table
