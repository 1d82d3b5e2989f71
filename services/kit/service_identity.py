"""A service's own identity, for calls that act for no user.

Service-to-service calls carry the caller's identity or a service identity, never nothing.
While handling a user's request a service forwards that user's token (services.kit.grpc_client
does it from `current_identity`). Work that no user started has no such token: event handlers
(a `message.delivered.v1` consumer resolving staff), background and scheduled jobs (reminders
coming due, escalations, repair loops) and start-up work (the revocation listener's bootstrap).
Those run under a service identity:

    tokens = ServiceTokens(settings.directory_grpc_target, "notifications", credentials.secret)
    with acting_as(tokens.identity(envelope.agency_id)):
        directory.resolve(...)          # the outgoing interceptor forwards the service token

`identity(agency_id)` is scoped to one agency: directory answers about that agency only, exactly
as for a staff token of that agency. Work about one agency's data always uses that agency's
identity. `identity()` (empty agency) is platform scope: it reaches platform methods only
(directory's ListRevokedSessions) and is refused by every agency-scoped one.

Tokens come from directory's IssueServiceToken (client credentials: the service's name and its
SERVICE_CLIENT_SECRET, read with services.kit.settings.service_client_credentials). Each agency's
token is cached until `refresh_margin_s` (60 s) before it expires; concurrent callers share one
request per agency. Never hand a service identity to code acting for a user: it would widen what
that user can reach.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from services.kit.auth import KIND_SERVICE, ROLE_SERVICE, SERVICE_SUBJECT_PREFIX, Identity, current_identity
from services.kit.errors import from_grpc_error
from services.kit.logs import correlation_id_var
from services.kit.transport import FROM_ENVIRONMENT, GrpcTls, open_channel

__all__ = ["IssuedToken", "ServiceTokens", "acting_as"]

ISSUE_METHOD = "/clinic.directory.v1.DirectoryService/IssueServiceToken"


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    expires_in: int  # seconds


# (client_id, client_secret, agency_id) -> IssuedToken; raises on refusal.
Issuer = Callable[[str, str, str], IssuedToken]


class _GrpcIssuer:
    """Calls directory's IssueServiceToken (an open method: no bearer token is sent)."""

    def __init__(self, target: str, deadline_s: float, tls: GrpcTls | None | object = FROM_ENVIRONMENT):
        # mTLS or plaintext as services.kit.transport decides, like every other channel.
        self._channel = open_channel(target, options=[("grpc.keepalive_time_ms", 30_000)], tls=tls)
        self._stub = directory_pb2_grpc.DirectoryServiceStub(self._channel)
        self._deadline_s = deadline_s

    def __call__(self, client_id: str, client_secret: str, agency_id: str) -> IssuedToken:
        metadata = []
        correlation_id = correlation_id_var.get()
        if correlation_id:
            metadata.append(("x-correlation-id", correlation_id))
        request = directory_pb2.IssueServiceTokenRequest(
            client_id=client_id, client_secret=client_secret, agency_id=agency_id
        )
        try:
            reply = self._stub.IssueServiceToken(request, timeout=self._deadline_s, metadata=metadata)
        except grpc.RpcError as exc:
            raise from_grpc_error(exc, "directory") from exc
        return IssuedToken(reply.access_token, int(reply.expires_in))

    def close(self) -> None:
        self._channel.close()


@dataclass
class _Cached:
    identity: Identity
    refresh_at: float


class ServiceTokens:
    """Service identities of one service client, per agency, cached until shortly before expiry."""

    def __init__(
        self,
        directory_target: str,
        client_id: str,
        client_secret: str,
        *,
        refresh_margin_s: float = 60.0,
        deadline_s: float = 3.0,
        issuer: Issuer | None = None,
        clock: Callable[[], float] = time.monotonic,
        tls: GrpcTls | None | object = FROM_ENVIRONMENT,
    ):
        if not client_id or not client_secret:
            raise ValueError("a service client needs an id and a secret")
        self.client_id = client_id
        self._secret = client_secret
        self._refresh_margin_s = refresh_margin_s
        self._clock = clock
        self._own_issuer = _GrpcIssuer(directory_target, deadline_s, tls) if issuer is None else None
        self._issue: Issuer = issuer or self._own_issuer  # type: ignore[assignment]
        self._cache: dict[str, _Cached] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def identity(self, agency_id: str = "") -> Identity:
        """The service identity for `agency_id` ("" = platform scope); fetched or from the cache."""
        cached = self._fresh(agency_id)
        if cached is not None:
            return cached
        with self._lock_for(agency_id):
            cached = self._fresh(agency_id)  # another thread may have fetched it meanwhile
            if cached is not None:
                return cached
            started = self._clock()
            issued = self._issue(self.client_id, self._secret, agency_id)
            identity = Identity(
                subject=f"{SERVICE_SUBJECT_PREFIX}{self.client_id}",
                agency_id=agency_id,
                roles=frozenset({ROLE_SERVICE}),
                kind=KIND_SERVICE,
                name=self.client_id,
                token=issued.access_token,
            )
            # Measured from before the request, so the cached token never outlives the real one.
            refresh_at = started + max(0.0, issued.expires_in - self._refresh_margin_s)
            with self._guard:
                self._cache[agency_id] = _Cached(identity, refresh_at)
            return identity

    def token(self, agency_id: str = "") -> str:
        return self.identity(agency_id).token

    def forget(self, agency_id: str | None = None) -> None:
        """Drop a cached token (all of them with None), e.g. after directory refused it."""
        with self._guard:
            if agency_id is None:
                self._cache.clear()
            else:
                self._cache.pop(agency_id, None)

    def close(self) -> None:
        if self._own_issuer is not None:
            self._own_issuer.close()

    def _fresh(self, agency_id: str) -> Identity | None:
        with self._guard:
            cached = self._cache.get(agency_id)
        if cached is not None and self._clock() < cached.refresh_at:
            return cached.identity
        return None

    def _lock_for(self, agency_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(agency_id, threading.Lock())


@contextmanager
def acting_as(identity: Identity) -> Iterator[Identity]:
    """Run the block as `identity`: outgoing gRPC calls (services.kit.grpc_client) carry its token."""
    token = current_identity.set(identity)
    try:
        yield identity
    finally:
        current_identity.reset(token)
