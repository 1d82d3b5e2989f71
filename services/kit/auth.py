"""Caller identity: verification of directory's RS256 access tokens.

Every service checks the token itself (the gateway is not the only lock) and
scopes every query to the token's agency. Keys come from directory's JWKS and
are cached; an unknown key id triggers one refetch (rate-limited), so key
rotation needs no restart.

Revocation: an access token names its session (`sid`). When directory ends a
session early (sign-out, refresh-token reuse, deactivation, password reset) it
announces `session.revoked.v1`; each service keeps the revoked session ids in a
`RevokedSessions` (filled by services.kit.revocations) and its `TokenVerifier`
refuses their tokens with `session_revoked`. An entry is kept until no access
token of that session can still be valid, then dropped. Directory, the source
of truth, checks its own sessions store instead.

Kinds: "staff" tokens always carry an agency; "service" tokens (issued to a
registered service client, see services.kit.service_identity) carry an agency
or, for platform-scope work that touches no agency's data, an empty one.
"""

from __future__ import annotations

import contextvars
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import jwt
import requests

ISSUER = "clinic-directory"
AUDIENCE = "clinic-message-board"
ALGORITHM = "RS256"
ACCESS_TOKEN_TTL_S = 15 * 60

ROLE_STAFF = "staff"
ROLE_ADMIN = "admin"
ROLE_COMPLIANCE_OFFICER = "compliance_officer"
ROLE_PRESCRIBER = "prescriber"
ROLES = (ROLE_STAFF, ROLE_ADMIN, ROLE_COMPLIANCE_OFFICER, ROLE_PRESCRIBER)
ROLE_SERVICE = "service"  # the one role of a service token

KIND_STAFF = "staff"
KIND_SERVICE = "service"
KINDS = (KIND_STAFF, KIND_SERVICE)
SERVICE_SUBJECT_PREFIX = "svc:"


class AuthError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Identity:
    """Who is calling: a staff member (kind "staff") or a service (kind "service")."""

    subject: str
    agency_id: str
    roles: frozenset[str] = field(default_factory=frozenset)
    kind: str = "staff"
    name: str = ""
    session_id: str = ""
    token: str = field(default="", repr=False)

    @property
    def staff_id(self) -> str:
        return self.subject

    def has_role(self, role: str) -> bool:
        return role in self.roles

    @property
    def is_admin(self) -> bool:
        return ROLE_ADMIN in self.roles


current_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("identity", default=None)


class JwksKeySource:
    """Public keys by key id, fetched from a JWKS URL and cached."""

    def __init__(self, url: str, ttl_s: float = 300.0, min_refetch_interval_s: float = 5.0, timeout_s: float = 3.0):
        self.url = url
        self.ttl_s = ttl_s
        self.min_refetch_interval_s = min_refetch_interval_s
        self.timeout_s = timeout_s
        self._keys: dict[str, object] = {}
        self._fetched_at = 0.0
        self._attempted_at = float("-inf")  # failures count too, so an outage is asked about once per interval
        self._lock = threading.Lock()

    def _fetch(self) -> None:
        response = requests.get(self.url, timeout=self.timeout_s)
        response.raise_for_status()
        keys = {}
        for jwk in response.json().get("keys", []):
            if jwk.get("kty") == "RSA" and jwk.get("kid"):
                keys[jwk["kid"]] = jwt.algorithms.RSAAlgorithm.from_jwk(json.dumps(jwk))
        self._keys = keys
        self._fetched_at = time.monotonic()

    def get(self, kid: str):
        with self._lock:
            now = time.monotonic()
            wanted = kid not in self._keys or now - self._fetched_at > self.ttl_s
            if wanted and now - self._attempted_at > self.min_refetch_interval_s:
                self._attempted_at = now
                try:
                    self._fetch()
                except (requests.RequestException, ValueError) as exc:
                    if kid not in self._keys:  # a cached key keeps working while directory is away
                        raise AuthError("auth_unavailable", "signing keys are unavailable") from exc
            elif kid not in self._keys and not self._keys and self._fetched_at == 0.0:
                raise AuthError("auth_unavailable", "signing keys are unavailable")
            return self._keys.get(kid)


class RevocationCheck(Protocol):
    """Answers whether a session has been revoked (RevokedSessions, or directory's own store)."""

    def is_revoked(self, session_id: str) -> bool: ...


class RevokedSessions:
    """Revoked session ids, each kept until its access tokens can no longer be valid (thread-safe).

    `revoke(session_id, access_expires_at_ms)` remembers the session until that instant plus
    `grace_ms` (the verifier's leeway and some clock skew between services); after that any
    token of the session has expired anyway, so the entry is dropped. Memory is therefore
    bounded by the revocations of one access-token lifetime.
    """

    def __init__(self, grace_ms: int = 60_000, clock: Callable[[], float] = time.time, prune_every_s: float = 10.0):
        self.grace_ms = grace_ms
        self._clock = clock
        self._forget_after: dict[str, int] = {}
        self._lock = threading.Lock()
        self._prune_every_ms = int(prune_every_s * 1000)
        self._pruned_at = 0

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def revoke(self, session_id: str, access_expires_at_ms: int) -> None:
        if not session_id:
            return
        forget_after = int(access_expires_at_ms) + self.grace_ms
        now = self._now_ms()
        with self._lock:
            if forget_after > self._forget_after.get(session_id, 0):
                self._forget_after[session_id] = forget_after
            if now - self._pruned_at >= self._prune_every_ms:
                self._prune(now)

    def is_revoked(self, session_id: str) -> bool:
        if not session_id:
            return False
        with self._lock:
            forget_after = self._forget_after.get(session_id)
            if forget_after is None:
                return False
            if forget_after <= self._now_ms():
                del self._forget_after[session_id]
                return False
            return True

    def prune(self) -> int:
        """Drop entries whose tokens have all expired; returns how many were dropped."""
        with self._lock:
            return self._prune(self._now_ms())

    def _prune(self, now: int) -> int:
        self._pruned_at = now
        expired = [sid for sid, until in self._forget_after.items() if until <= now]
        for sid in expired:
            del self._forget_after[sid]
        return len(expired)

    def __len__(self) -> int:
        with self._lock:
            return len(self._forget_after)


class StaticKeySource:
    """Keys known in-process (directory verifies with its own keys)."""

    def __init__(self, keys: Callable[[], dict[str, object]]):
        self._keys = keys

    def get(self, kid: str):
        return self._keys().get(kid)


class TokenVerifier:
    """Checks signature, issuer, audience, expiry and claim shapes; with `revoked`, refuses tokens
    of revoked sessions (code `session_revoked`)."""

    def __init__(self, keys, revoked: RevocationCheck | None = None, leeway_s: int = 30):
        self.keys = keys
        self.revoked = revoked
        self.leeway_s = leeway_s

    def verify(self, token: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise AuthError("invalid_token", "the access token is malformed") from exc
        if header.get("alg") != ALGORITHM:
            raise AuthError("invalid_token", "the access token uses an unsupported algorithm")
        key = self.keys.get(str(header.get("kid", "")))
        if key is None:
            raise AuthError("invalid_token", "the access token was signed with an unknown key")
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                leeway=self.leeway_s,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("token_expired", "the access token has expired") from exc
        except jwt.InvalidTokenError as exc:
            raise AuthError("invalid_token", "the access token is not valid") from exc
        if claims.get("typ") != "access" or not isinstance(claims.get("agency_id"), str):
            raise AuthError("invalid_token", "the token is not an access token")
        kind = claims.get("kind", KIND_STAFF)
        if kind not in KINDS:
            raise AuthError("invalid_token", "the access token's kind is unknown")
        if not claims["agency_id"] and kind != KIND_SERVICE:
            raise AuthError("invalid_token", "the access token names no agency")
        roles = claims.get("roles", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise AuthError("invalid_token", "the access token's roles are malformed")
        session_id = claims.get("sid", "")
        if not isinstance(session_id, str):
            raise AuthError("invalid_token", "the access token's session is malformed")
        if session_id and self.revoked is not None and self.revoked.is_revoked(session_id):
            raise AuthError("session_revoked", "the session has ended; sign in again")
        return Identity(
            subject=str(claims["sub"]),
            agency_id=claims["agency_id"],
            roles=frozenset(roles),
            kind=kind,
            name=str(claims.get("name", "")),
            session_id=session_id,
            token=token,
        )


def agency_caller() -> Identity:
    """The current caller, scoped to one agency (staff, or a service token issued for that agency).

    Agency-scoped handlers call this; a platform-scope service token is refused here, once, for all.
    """
    from services.kit.errors import Forbidden, Unauthenticated

    identity = current_identity.get()
    if identity is None:
        raise Unauthenticated("unauthenticated", "no caller identity")
    if not identity.agency_id:
        raise Forbidden("agency_scope_required", "a platform-scope token cannot read agency data")
    return identity


def platform_caller() -> Identity:
    """The current caller, which must be a platform-scope service token (no agency)."""
    from services.kit.errors import Forbidden, Unauthenticated

    identity = current_identity.get()
    if identity is None:
        raise Unauthenticated("unauthenticated", "no caller identity")
    if identity.kind != KIND_SERVICE or identity.agency_id:
        raise Forbidden("platform_scope_required", "only a platform-scope service token may call this")
    return identity


def bearer_token(header_value: str | None) -> str | None:
    if not header_value:
        return None
    scheme, _, token = header_value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
