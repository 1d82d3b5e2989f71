"""erx-bridge's view of directory: who has ePrescribing, their clinician ids, the agency's
subscription, terminology and time zone.

Every call carries the current identity: the staff member's own token while serving their request,
the agency's service identity (kit `acting_as`) for syncs no request is waiting on. Answers that
change rarely (a staff member's flag, the agency's settings) are cached `cache_s` seconds per
(agency, staff) / agency, so a flag turned off in directory stops ePrescribing within that time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from services.kit import grpc_client
from services.kit.cache import TtlCache
from services.kit.errors import from_grpc_error


@dataclass(frozen=True)
class Prescriber:
    """A staff member with ePrescribing, as the bridge needs them."""

    agency_id: str
    staff_id: str
    clinician_id: str  # empty when directory holds none for them
    display_name: str = ""
    active: bool = True
    eprescribing_enabled: bool = True


@dataclass(frozen=True)
class AgencyErx:
    """An agency's ePrescribing settings and what its boards say."""

    agency_id: str
    subscribed: bool
    vendor: str
    clinic_id: str
    time_zone: str
    patient_word: str  # "Client" or "Patient"


def _prescriber(staff: directory_pb2.Staff) -> Prescriber:
    return Prescriber(
        agency_id=staff.agency_id,
        staff_id=staff.staff_id,
        clinician_id=staff.erx_clinician_id,
        display_name=staff.display_name,
        active=staff.active,
        eprescribing_enabled=staff.eprescribing_enabled,
    )


class DirectoryClient:
    def __init__(
        self, target: str, cache_s: float = 30.0, deadline_s: float = 3.0, clock: Callable[[], float] = time.monotonic
    ):
        self._channel = grpc_client.channel(target, default_deadline_s=deadline_s)
        self._stub = directory_pb2_grpc.DirectoryServiceStub(self._channel)
        self._staff: TtlCache[tuple[str, str], Prescriber | None] = TtlCache(cache_s, clock=clock)
        self._settings: TtlCache[str, AgencyErx] = TtlCache(cache_s, clock=clock)

    def _call(self, method: str, request):
        try:
            return getattr(self._stub, method)(request)
        except grpc.RpcError as exc:
            raise from_grpc_error(exc, "directory") from exc

    def agency(self, agency_id: str) -> AgencyErx:
        """The calling identity's agency's ePrescribing settings (cached)."""
        return self._settings.get_or_load(agency_id, lambda: self._fetch_agency(agency_id))

    def _fetch_agency(self, agency_id: str) -> AgencyErx:
        reply = self._call("GetAgencySettings", directory_pb2.GetAgencySettingsRequest())
        return AgencyErx(
            agency_id=reply.agency_id or agency_id,
            subscribed=bool(reply.erx_subscription),
            vendor=reply.erx_vendor,
            clinic_id=reply.erx_clinic_id,
            time_zone=reply.time_zone,
            patient_word=reply.terminology.patient_singular or "Patient",
        )

    def member(self, agency_id: str, staff_id: str) -> Prescriber | None:
        """One staff member of the caller's agency (cached), or None when directory knows no such
        active member there."""
        return self._staff.get_or_load((agency_id, staff_id), lambda: self._fetch_member(agency_id, staff_id))

    def _fetch_member(self, agency_id: str, staff_id: str) -> Prescriber | None:
        reply = self._call("GetStaff", directory_pb2.GetStaffRequest(staff_ids=[staff_id]))
        for staff in reply.staff:
            if staff.staff_id == staff_id and staff.agency_id == agency_id and staff.active:
                return _prescriber(staff)
        return None

    def prescribers(self, agency_id: str) -> list[Prescriber]:
        """The agency's active staff with ePrescribing (uncached), sorted by staff id: directory
        lists them only when the agency subscribes."""
        reply = self._call("ListStaff", directory_pb2.ListStaffRequest(eprescribing_only=True))
        return [
            _prescriber(staff)
            for staff in reply.staff
            if staff.agency_id in ("", agency_id) and staff.active and staff.eprescribing_enabled
        ]

    def close(self) -> None:
        self._channel.close()
