"""Notifications' view of directory: who in an agency is flagged for what, briefly cached.

Every call carries the current identity (a service token acting for the agency, or the staff
member's own token), so directory answers about that agency only.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from services.kit import grpc_client
from services.kit.cache import TtlCache
from services.kit.errors import from_grpc_error
from services.kit.validation import ID_PATTERN

GET_STAFF_BATCH = 500
NPI_PATTERN = re.compile(r"^[0-9]{10}$")
ROLE_NUMBERS = {
    "staff": directory_pb2.ROLE_STAFF,
    "admin": directory_pb2.ROLE_ADMIN,
    "compliance_officer": directory_pb2.ROLE_COMPLIANCE_OFFICER,
    "prescriber": directory_pb2.ROLE_PRESCRIBER,
}


def split_provider_refs(refs: list[str]) -> tuple[list[str], list[str]]:
    """(staff ids, NPIs) named by "staff:<directory id>" and "npi:<10 digits>" refs, each once;
    anything else is left out (directory would not know it)."""
    staff_ids: dict[str, None] = {}
    npis: dict[str, None] = {}
    for ref in refs:
        kind, _, value = ref.partition(":")
        if kind == "staff" and ID_PATTERN.fullmatch(value):
            staff_ids[value] = None
        elif kind == "npi" and NPI_PATTERN.fullmatch(value):
            npis[value] = None
    return list(staff_ids), list(npis)


@dataclass(frozen=True)
class StaffFlags:
    staff_id: str
    active: bool
    lab_result_notification: bool
    roles: tuple[int, ...]
    team_ids: tuple[str, ...]


class DirectoryClient:
    def __init__(
        self, target: str, cache_s: float = 30.0, deadline_s: float = 3.0, clock: Callable[[], float] = time.monotonic
    ):
        self._channel = grpc_client.channel(target, default_deadline_s=deadline_s)
        self._stub = directory_pb2_grpc.DirectoryServiceStub(self._channel)
        self._staff: TtlCache[str, list[StaffFlags]] = TtlCache(cache_s, clock=clock)
        self._settings: TtlCache[str, directory_pb2.GetAgencySettingsResponse] = TtlCache(cache_s, clock=clock)
        self._clock = clock
        self._used: dict[str, float] = {}  # agency -> when its staff list or settings were last asked for
        self.cache_s = cache_s

    def _call(self, method: str, request):
        try:
            return getattr(self._stub, method)(request)
        except grpc.RpcError as exc:
            raise from_grpc_error(exc, "directory") from exc

    def agency_staff(self, agency_id: str) -> list[StaffFlags]:
        """Every active staff member of the agency with their flags; cached `cache_s` per agency, so a
        flag changed in directory reaches new messages within that time. Reloaded in the background
        once it is older than half of that, so a lab result never waits for the whole list (it takes
        about a second for an agency of a thousand staff on a busy machine)."""
        self.mark_used(agency_id)
        return self._staff.get_or_load(
            agency_id, lambda: self._fetch_agency_staff(agency_id), refresh_after_s=self._staff.ttl_s / 2
        )

    def _fetch_agency_staff(self, agency_id: str) -> list[StaffFlags]:
        ids = list(self._call("ResolveRecipients", directory_pb2.ResolveRecipientsRequest(whole_agency=True)).staff_ids)
        staff: list[StaffFlags] = []
        for start in range(0, len(ids), GET_STAFF_BATCH):
            reply = self._call(
                "GetStaff", directory_pb2.GetStaffRequest(staff_ids=ids[start : start + GET_STAFF_BATCH])
            )
            staff += [
                StaffFlags(s.staff_id, s.active, s.lab_result_notification, tuple(s.roles), tuple(s.team_ids))
                for s in reply.staff
                if s.active and s.agency_id == agency_id
            ]
        return staff

    def lab_recipients(self, agency_id: str) -> list[str]:
        """Active staff flagged Lab Result Notification, in directory's order."""
        return [s.staff_id for s in self.agency_staff(agency_id) if s.lab_result_notification]

    def agency_settings(self, agency_id: str) -> directory_pb2.GetAgencySettingsResponse:
        """The agency's options (notify_linked_staff_on_schedule_change,
        notify_ordering_provider_of_results, ...), cached like staff (and, like staff, reloaded in the
        background past half its time, so no lab result waits for directory)."""
        self.mark_used(agency_id)
        return self._settings.get_or_load(
            agency_id, self._fetch_settings, refresh_after_s=self._settings.ttl_s / 2
        )

    def _fetch_settings(self) -> directory_pb2.GetAgencySettingsResponse:
        return self._call("GetAgencySettings", directory_pb2.GetAgencySettingsRequest())

    # --- kept warm ------------------------------------------------------------------------------
    def mark_used(self, agency_id: str) -> None:
        """Count the agency as used now (kept warm from the start: a registered facility's)."""
        self._used[agency_id] = self._clock()

    def recently_used(self, within_s: float) -> list[str]:
        """Agencies whose staff list or settings were asked for within the last `within_s`."""
        since = self._clock() - within_s
        return [agency for agency, at in list(self._used.items()) if at >= since]

    def keep_warm(self, agency_id: str) -> int:
        """Reload the agency's staff list and settings once past half their cache time, so a lab
        result arriving after a quiet spell never waits for them (refresh ahead alone reloads only
        when asked). The caller acts as the agency's service identity. How many were reloaded."""
        reloaded = 0
        for cache, load in (
            (self._staff, lambda: self._fetch_agency_staff(agency_id)),
            (self._settings, self._fetch_settings),
        ):
            age = cache.age(agency_id)
            if age is not None and age < cache.ttl_s / 2:
                continue
            started = self._clock()
            cache.put(agency_id, load(), at=started)
            reloaded += 1
        return reloaded

    def staff(self, staff_ids: list[str]) -> list[directory_pb2.Staff]:
        """Staff records of the caller's agency (uncached)."""
        return list(self._call("GetStaff", directory_pb2.GetStaffRequest(staff_ids=staff_ids)).staff)

    def resolve(
        self, staff_ids: list[str], team_ids: list[str], npis: list[str] | tuple[str, ...] = ()
    ) -> directory_pb2.ResolveRecipientsResponse:
        """The active staff these staff ids, team ids and provider NPIs reach (uncached); unknown ones
        in missing_*."""
        return self._call(
            "ResolveRecipients",
            directory_pb2.ResolveRecipientsRequest(staff_ids=staff_ids, team_ids=team_ids, npis=list(npis)),
        )

    def staff_ids_for_providers(self, refs: list[str]) -> list[str]:
        """The caller's agency's active staff that provider refs name ("npi:<10 digits>" or
        "staff:<directory id>"), sorted by id; unknown, inactive and unreadable refs are skipped."""
        staff_ids, npis = split_provider_refs(refs)
        if not staff_ids and not npis:
            return []
        return list(self.resolve(staff_ids, [], npis).staff_ids)

    def list_staff(self, role: str) -> list[str]:
        """Ids of the agency's active staff holding `role` (uncached), sorted."""
        reply = self._call("ListStaff", directory_pb2.ListStaffRequest(role=ROLE_NUMBERS[role]))
        return [s.staff_id for s in reply.staff]

    def close(self) -> None:
        self._channel.close()
