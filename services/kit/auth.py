"""Caller identity: verification of directory's RS256 access tokens.

Every service checks the token itself (the gateway is not the only lock) and
scopes every query to the token's agency. Keys come from directory's JWKS and
are cached; an unknown key id triggers one refetch (rate-limited), so key
rotation needs no restart.
"""

from __future__ import annotations

import contextvars
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

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
            age = time.monotonic() - self._fetched_at
            stale = age > self.ttl_s
            if (kid not in self._keys and age > self.min_refetch_interval_s) or stale:
                try:
                    self._fetch()
                except (requests.RequestException, ValueError) as exc:
                    if kid not in self._keys:
                        raise AuthError("auth_unavailable", "signing keys are unavailable") from exc
            return self._keys.get(kid)


class StaticKeySource:
    """Keys known in-process (directory verifies with its own keys)."""

    def __init__(self, keys: Callable[[], dict[str, object]]):
        self._keys = keys

    def get(self, kid: str):
        return self._keys().get(kid)


class TokenVerifier:
    def __init__(self, keys, leeway_s: int = 30):
        self.keys = keys
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
        roles = claims.get("roles", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise AuthError("invalid_token", "the access token's roles are malformed")
        return Identity(
            subject=str(claims["sub"]),
            agency_id=claims["agency_id"],
            roles=frozenset(roles),
            kind=claims.get("kind", "staff"),
            name=str(claims.get("name", "")),
            session_id=str(claims.get("sid", "")),
            token=token,
        )


def bearer_token(header_value: str | None) -> str | None:
    if not header_value:
        return None
    scheme, _, token = header_value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
