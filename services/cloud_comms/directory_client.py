"""cloud-comms' view of directory: which agency and which linked staff a cloud address (a Direct
address or a fax number) reaches.

`ResolveCloudAddress` is called before the agency is known (an SMTP RCPT TO, an inbound fax), so
with this service's platform-scope identity (`service_tokens.identity("")`), which directory grants
the service client "cloud-comms" only. Answers are cached `cache_s` seconds per (kind, address):
a staff link changed in directory reaches new messages within that time.

`team` (triage's routing by document type) asks `ResolveRecipients` as the agency's own
service identity (`service_tokens.identity(agency_id)`), uncached: routing is rare and must reach
the team as it is now.
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
from services.kit.service_identity import acting_as

KINDS = ("direct", "fax")


@dataclass(frozen=True)
class CloudAddress:
    """A known cloud address: its agency, directory's id for it, its active linked staff, a label."""

    kind: str
    address: str
    agency_id: str
    address_id: str
    staff_ids: tuple[str, ...]
    label: str = ""


@dataclass(frozen=True)
class Team:
    id: str
    name: str
    staff_ids: tuple[str, ...]


def normalize(kind: str, address: str) -> str:
    address = address.strip()
    return address.lower() if kind == "direct" else address


class DirectoryClient:
    def __init__(
        self,
        target: str,
        service_tokens,
        cache_s: float = 30.0,
        deadline_s: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._channel = grpc_client.channel(target, default_deadline_s=deadline_s)
        self._stub = directory_pb2_grpc.DirectoryServiceStub(self._channel)
        self._tokens = service_tokens
        self._addresses: TtlCache[tuple[str, str], CloudAddress | None] = TtlCache(cache_s, clock=clock)
        self._settings: TtlCache[str, directory_pb2.GetAgencySettingsResponse] = TtlCache(cache_s, clock=clock)

    def resolve_address(self, kind: str, address: str) -> CloudAddress | None:
        """The agency and linked staff of `address` ("direct" | "fax"), None when directory knows
        no such address. Raises kit errors (Unavailable...) when directory cannot answer."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        key = (kind, normalize(kind, address))
        return self._addresses.get_or_load(key, lambda: self._fetch(*key))

    def _fetch(self, kind: str, address: str) -> CloudAddress | None:
        request = directory_pb2.ResolveCloudAddressRequest(kind=kind, address=address)
        with acting_as(self._tokens.identity("")):
            try:
                reply = self._stub.ResolveCloudAddress(request)
            except grpc.RpcError as exc:
                raise from_grpc_error(exc, "directory") from exc
        if not reply.found:
            return None
        return CloudAddress(kind, address, reply.agency_id, reply.address_id, tuple(reply.staff_ids), reply.label)

    def linked_addresses(self, kind: str, agency_id: str, staff_id: str) -> list[CloudAddress]:
        """The addresses of `kind` this staff member of the agency is linked to (the ones they may
        send from), by address; not cached (asked once per send). Raises kit errors when directory
        cannot answer."""
        request = directory_pb2.ListLinkedCloudAddressesRequest(kind=kind, agency_id=agency_id, staff_id=staff_id)
        with acting_as(self._tokens.identity("")):
            try:
                reply = self._stub.ListLinkedCloudAddresses(request)
            except grpc.RpcError as exc:
                raise from_grpc_error(exc, "directory") from exc
        return [
            CloudAddress(kind, a.address, agency_id, a.address_id, tuple(a.staff_ids), a.label) for a in reply.addresses
        ]

    def team(self, agency_id: str, team_id: str) -> Team | None:
        """One of the agency's teams: its name and active members (directory's order); None when the
        agency has no such team. Raises kit errors (Unavailable...) when directory cannot answer."""
        request = directory_pb2.ResolveRecipientsRequest(team_ids=[team_id])
        with acting_as(self._tokens.identity(agency_id)):
            try:
                reply = self._stub.ResolveRecipients(request)
            except grpc.RpcError as exc:
                raise from_grpc_error(exc, "directory") from exc
        if team_id in reply.missing_team_ids:
            return None
        return Team(team_id, reply.team_names.get(team_id, ""), tuple(reply.staff_ids))

    def agency_settings(self, agency_id: str) -> directory_pb2.GetAgencySettingsResponse:
        """The agency's settings (time zone, terminology), asked as the caller's current identity
        (acting_as the agency's service identity); cached like addresses."""

        def fetch() -> directory_pb2.GetAgencySettingsResponse:
            try:
                return self._stub.GetAgencySettings(directory_pb2.GetAgencySettingsRequest())
            except grpc.RpcError as exc:
                raise from_grpc_error(exc, "directory") from exc

        return self._settings.get_or_load(agency_id, fetch)

    def close(self) -> None:
        self._channel.close()
