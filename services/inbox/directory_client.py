"""Inbox's view of directory: recipient resolution (and who has ePrescribing) over gRPC with the
caller's identity."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from services.inbox.domain import Addressing
from services.kit import grpc_client
from services.kit.auth import KIND_SERVICE, current_identity
from services.kit.cache import TtlCache
from services.kit.errors import Forbidden, InvalidInput, from_grpc_error

T = TypeVar("T")


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
RECIPIENT_CACHE_MAX_IDS = 50_000


class RecipientCache:
    """Directory's answer for explicitly addressed staff ids, remembered per agency for `max_age_s`.

    Producers (lab results, schedules) deliver to the same few staff over and over; asking
    directory each time was half of a delivery's work. Only a request naming staff ids alone is
    answered here, and only when every id was seen within `max_age_s`: then its active ids are the
    recipients (sorted, as directory sorts them) and its deactivated ids are known but left out.
    Teams and the whole agency always go to directory (membership changes more often).

    Staleness, bounded by `max_age_s`: a staff member deactivated (or moved to another agency) in
    directory can still be a recipient for up to that long; one reactivated stays left out that
    long. Unknown ids are never remembered, so a new staff member is a recipient at once and a
    refusal (unknown_recipients) always comes from directory's current answer. `max_age_s` = 0
    turns the cache off.
    """

    def __init__(
        self,
        resolve: Callable[[Addressing], Resolution],
        max_age_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_ids: int = RECIPIENT_CACHE_MAX_IDS,
    ):
        self._resolve = resolve
        self._max_age_s = max_age_s
        self._clock = clock
        self._max_ids = max_ids
        self._seen: dict[tuple[str, str], tuple[float, bool]] = {}  # (agency, staff) -> (when, active)
        self._lock = threading.Lock()

    def resolve(self, agency_id: str, addressing: Addressing) -> Resolution:
        """Like DirectoryClient.resolve for the caller's agency `agency_id`."""
        if self._max_age_s <= 0 or addressing.team_ids or addressing.whole_agency or not addressing.staff_ids:
            return self._resolve(addressing)
        ids = list(dict.fromkeys(addressing.staff_ids))
        now = self._clock()
        with self._lock:
            known = [self._seen.get((agency_id, staff_id)) for staff_id in ids]
        if all(entry is not None and now - entry[0] < self._max_age_s for entry in known):
            active = sorted(staff_id for staff_id, entry in zip(ids, known, strict=True) if entry[1])
            return Resolution(active, [], [])
        asked_at = self._clock()
        resolution = self._resolve(addressing)
        missing = set(resolution.missing_staff_ids)
        active = set(resolution.staff_ids)
        with self._lock:
            if len(self._seen) + len(ids) > self._max_ids:
                self._seen = {k: v for k, v in self._seen.items() if asked_at - v[0] < self._max_age_s}
                if len(self._seen) + len(ids) > self._max_ids:
                    self._seen.clear()
            for staff_id in ids:
                if staff_id in missing:
                    self._seen.pop((agency_id, staff_id), None)
                else:
                    self._seen[(agency_id, staff_id)] = (asked_at, staff_id in active)
        return resolution


class EprescriberCache:
    """Directory's answer to "who in this agency has ePrescribing" (ListStaff eprescribing_only: active
    staff flagged for it, in an agency that subscribes), remembered per agency for `max_age_s`.

    An eRx delivery may only name staff with ePrescribing. Erx-bridge delivers to the same few
    prescribers over and over, so the answer is reused, with the RecipientCache's staleness: a
    prescriber who loses ePrescribing (flag cleared, deactivated, the agency stops subscribing) can
    still receive eRx items for up to `max_age_s`. A refusal is never stale: a rule that refuses on a
    remembered answer is applied again to directory's answer of now (`check`), so a staff member
    just given ePrescribing receives eRx items at once. `max_age_s` = 0 turns the cache off.
    """

    def __init__(
        self,
        load: Callable[[], frozenset[str]],
        max_age_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_agencies: int = 10_000,
    ):
        self._load = load
        self._answers: TtlCache[str, frozenset[str]] = TtlCache(max_age_s, max_entries=max_agencies, clock=clock)

    def check(self, agency_id: str, rule: Callable[[frozenset[str]], T]) -> T:
        """`rule(ids)` for the staff ids of agency `agency_id` (the caller's) with ePrescribing. When the
        rule refuses (raises Forbidden) on a remembered answer, it is applied to a fresh one instead."""
        loaded = []

        def load() -> frozenset[str]:
            loaded.append(True)
            return self._load()

        answer = self._answers.get_or_load(agency_id, load)
        try:
            return rule(answer)
        except Forbidden:
            if loaded:
                raise
        self._answers.forget(agency_id)
        return rule(self._answers.get_or_load(agency_id, self._load))


class DirectoryClient:
    """Every call carries the current caller's identity (a staff token, or a service token acting
    for an agency), so answers are always scoped to that agency."""

    def __init__(self, target: str, deadline_s: float = 3.0):
        self._channel = grpc_client.channel(target, default_deadline_s=deadline_s)
        self._stub = directory_pb2_grpc.DirectoryServiceStub(self._channel)
        self._settings: TtlCache[tuple[str, bool], AgencySettings] = TtlCache(SETTINGS_TTL_S)

    def _call(self, method: str, request):
        try:
            return getattr(self._stub, method)(request)
        except grpc.RpcError as exc:
            raise from_grpc_error(exc, "directory") from exc

    def agency_settings(self, agency_id: str) -> AgencySettings:
        """The caller's agency settings (terminology, time zone, portal), cached for a minute.

        Directory names the agency's portal consumer to services and admins only (as its HTTP twin
        does), so answers are cached apart for them and for other staff: a staff member's answer
        must never be the one the portal check reads."""
        caller = current_identity.get()
        sees_all = caller is not None and (caller.kind == KIND_SERVICE or caller.is_admin)
        return self._settings.get_or_load((agency_id, sees_all), self._fetch_agency_settings)

    def _fetch_agency_settings(self) -> AgencySettings:
        reply = self._call("GetAgencySettings", directory_pb2.GetAgencySettingsRequest())
        return AgencySettings(
            agency_id=reply.agency_id,
            name=reply.name,
            patient_singular=reply.terminology.patient_singular or "Patient",
            patient_plural=reply.terminology.patient_plural or "Patients",
            time_zone=reply.time_zone or "UTC",
            portal_consumer=reply.portal_consumer,
        )

    def staff(self, staff_ids: list[str]) -> tuple[list, list[str]]:
        """(directory_pb2.Staff records, ids unknown in the caller's agency)."""
        reply = self._call("GetStaff", directory_pb2.GetStaffRequest(staff_ids=staff_ids))
        return list(reply.staff), list(reply.missing_staff_ids)

    def eprescriber_ids(self) -> frozenset[str]:
        """The caller's agency's staff with ePrescribing: active, flagged, and the agency subscribes
        (directory applies all three; none when the agency does not subscribe)."""
        reply = self._call("ListStaff", directory_pb2.ListStaffRequest(eprescribing_only=True))
        return frozenset(member.staff_id for member in reply.staff if member.eprescribing_enabled and member.active)

    def admin_ids(self) -> list[str]:
        """The caller's agency's active admins, sorted."""
        reply = self._call("ListStaff", directory_pb2.ListStaffRequest(role=directory_pb2.ROLE_ADMIN))
        return sorted(member.staff_id for member in reply.staff if member.active)

    def supervisors(self, staff_ids: list[str]) -> dict[str, str]:
        """staff id -> their supervisor's id, for the members of the caller's agency among `staff_ids`
        whose supervisor is set and active ("" when a member has none, or an inactive one)."""
        if not staff_ids:
            return {}
        members, _ = self.staff(list(dict.fromkeys(staff_ids)))
        named = {m.staff_id: m.supervisor_id for m in members if m.supervisor_id}
        wanted = sorted(set(named.values()))
        active = {m.staff_id for m in self.staff(wanted)[0] if m.active} if wanted else set()
        return {m.staff_id: (named.get(m.staff_id, "") if named.get(m.staff_id) in active else "") for m in members}

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
