"""Inbox's view of directory: recipient resolution over gRPC with the caller's identity."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from services.inbox.domain import Addressing
from services.kit import grpc_client
from services.kit.errors import InvalidInput, from_grpc_error


@dataclass(frozen=True)
class Resolution:
    staff_ids: list[str]
    missing_staff_ids: list[str]
    missing_team_ids: list[str]

    def require_known(self, message: str = "some recipients do not exist in your agency") -> list[str]:
        """The resolved staff ids; 400 `unknown_recipients` (naming them) when any id was unknown."""
        if self.missing_staff_ids or self.missing_team_ids:
            raise InvalidInput(
                "unknown_recipients",
                message,
                {"staff_ids": self.missing_staff_ids, "team_ids": self.missing_team_ids},
            )
        return self.staff_ids


@dataclass(frozen=True)
class AgencySettings:
    agency_id: str
    name: str
    patient_singular: str
    patient_plural: str
    time_zone: str
    portal_consumer: str


@dataclass(frozen=True)
class PortalPatient:
    patient_id: str
    agency_id: str
    portal_user_id: str
    display_name: str = field(repr=False)  # PHI: never in a repr


SETTINGS_TTL_S = 60.0


class DirectoryClient:
    """Every call carries the current caller's identity (a staff token, or a service token acting
    for an agency), so answers are always scoped to that agency."""

    def __init__(self, target: str, deadline_s: float = 3.0):
        self._channel = grpc_client.channel(target, default_deadline_s=deadline_s)
        self._stub = directory_pb2_grpc.DirectoryServiceStub(self._channel)
        self._settings: dict[str, tuple[float, AgencySettings]] = {}
        self._lock = threading.Lock()

    def _call(self, method: str, request):
        try:
            return getattr(self._stub, method)(request)
        except grpc.RpcError as exc:
            raise from_grpc_error(exc, "directory") from exc

    def agency_settings(self, agency_id: str) -> AgencySettings:
        """The caller's agency settings (terminology, time zone, portal), cached for a minute."""
        now = time.monotonic()
        with self._lock:
            cached = self._settings.get(agency_id)
        if cached is not None and now - cached[0] < SETTINGS_TTL_S:
            return cached[1]
        reply = self._call("GetAgencySettings", directory_pb2.GetAgencySettingsRequest())
        settings = AgencySettings(
            agency_id=reply.agency_id,
            name=reply.name,
            patient_singular=reply.terminology.patient_singular or "Patient",
            patient_plural=reply.terminology.patient_plural or "Patients",
            time_zone=reply.time_zone or "UTC",
            portal_consumer=reply.portal_consumer,
        )
        with self._lock:
            self._settings[agency_id] = (now, settings)
        return settings

    def staff(self, staff_ids: list[str]) -> tuple[list, list[str]]:
        """(directory_pb2.Staff records, ids unknown in the caller's agency)."""
        reply = self._call("GetStaff", directory_pb2.GetStaffRequest(staff_ids=staff_ids))
        return list(reply.staff), list(reply.missing_staff_ids)

    def portal_patient(self, *, patient_id: str = "", portal_user_id: str = "") -> PortalPatient:
        """One portal patient of the caller's agency; NotFound when unknown there."""
        reply = self._call(
            "GetPortalPatient",
            directory_pb2.GetPortalPatientRequest(patient_id=patient_id, portal_user_id=portal_user_id),
        )
        return PortalPatient(reply.patient_id, reply.agency_id, reply.portal_user_id, reply.display_name)

    def resolve(self, addressing: Addressing) -> Resolution:
        request = directory_pb2.ResolveRecipientsRequest(
            staff_ids=list(addressing.staff_ids),
            team_ids=list(addressing.team_ids),
            whole_agency=addressing.whole_agency,
        )
        reply = self._call("ResolveRecipients", request)
        return Resolution(list(reply.staff_ids), list(reply.missing_staff_ids), list(reply.missing_team_ids))

    def close(self) -> None:
        self._channel.close()
