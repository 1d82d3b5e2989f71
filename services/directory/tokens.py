"""Access token signing, refresh tokens and the published JWKS.

Access tokens are RS256 JWTs that every service (and the gateway) verifies with
the public keys published here. The key id is the RFC 7638 thumbprint of the
public key, so it is stable across restarts and identical on every replica.
Refresh tokens are opaque random strings; only their SHA-256 is stored.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.kit.auth import ALGORITHM, AUDIENCE, ISSUER, KIND_SERVICE, ROLE_SERVICE, SERVICE_SUBJECT_PREFIX

MIN_KEY_BITS = 2048  # also the size of the key generated for development
REFRESH_TOKEN_BYTES = 32
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----", re.DOTALL)


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def public_jwk_members(public_key: rsa.RSAPublicKey) -> dict[str, str]:
    numbers = public_key.public_numbers()
    return {"e": _b64url_uint(numbers.e), "kty": "RSA", "n": _b64url_uint(numbers.n)}


def jwk_thumbprint(public_key: rsa.RSAPublicKey) -> str:
    """RFC 7638: SHA-256 over the required members in lexicographic order, no whitespace."""
    canonical = json.dumps(public_jwk_members(public_key), sort_keys=True, separators=(",", ":"))
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


@dataclass(frozen=True)
class SigningKey:
    kid: str
    public_key: rsa.RSAPublicKey
    private_key: rsa.RSAPrivateKey | None = None

    @property
    def public_pem(self) -> str:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def jwk(self) -> dict[str, str]:
        return {**public_jwk_members(self.public_key), "kid": self.kid, "use": "sig", "alg": ALGORITHM}


@dataclass(frozen=True)
class KeySet:
    """The active signing key first, then earlier keys that still verify."""

    keys: tuple[SigningKey, ...]

    @property
    def active(self) -> SigningKey:
        return self.keys[0]

    @classmethod
    def from_pem(cls, text: str) -> KeySet:
        if "\\n" in text and "\n" not in text:
            text = text.replace("\\n", "\n")  # a PEM squeezed onto one line by a deployment tool
        blocks = [m.group(0) for m in _PEM_BLOCK.finditer(text)]
        if not blocks:
            raise ValueError("no PEM key found")
        keys: list[SigningKey] = []
        for index, block in enumerate(blocks):
            key = _load_pem_block(block, index)
            if index == 0 and key.private_key is None:
                raise ValueError("the first key must be an RSA private key (it signs new tokens)")
            if all(existing.kid != key.kid for existing in keys):
                keys.append(key)
        return cls(tuple(keys))

    def verification_keys(self) -> dict[str, rsa.RSAPublicKey]:
        return {key.kid: key.public_key for key in self.keys}

    def jwks(self) -> dict:
        return {"keys": [key.jwk() for key in self.keys]}


def _load_pem_block(block: str, index: int) -> SigningKey:
    data = block.encode()
    try:
        if "PRIVATE KEY" in block.split("\n", 1)[0]:
            private_key = serialization.load_pem_private_key(data, password=None)
            public_key = private_key.public_key()
        else:
            private_key = None
            public_key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"key #{index + 1} is not a readable unencrypted PEM key") from exc
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise ValueError(f"key #{index + 1} is not an RSA key")
    if public_key.key_size < MIN_KEY_BITS:
        raise ValueError(f"key #{index + 1} has {public_key.key_size} bits; at least {MIN_KEY_BITS} are required")
    return SigningKey(kid=jwk_thumbprint(public_key), public_key=public_key, private_key=private_key)  # type: ignore[arg-type]


def generate_private_key_pem(bits: int = MIN_KEY_BITS) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


class HasSigningKeys(Protocol):
    """What public_key_pem reads (config.DirectorySettings), named here so tokens needs no config."""

    @property
    def signing_keys(self) -> KeySet: ...


def public_key_pem(settings: HasSigningKeys) -> str:
    """The active public key, e.g. for the gateway's jwt credential."""
    return settings.signing_keys.active.public_pem


@dataclass(frozen=True)
class AccessToken:
    token: str
    expires_in: int


def _sign(keys: KeySet, ttl_s: int, now: int | None, **claims: object) -> AccessToken:
    """Sign an access token: the common claims plus the caller's."""
    issued_at = int(time.time()) if now is None else now
    body = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        **claims,
        "jti": secrets.token_urlsafe(16),
        "iat": issued_at,
        "nbf": issued_at,
        "exp": issued_at + ttl_s,
        "typ": "access",
    }
    token = jwt.encode(body, keys.active.private_key, algorithm=ALGORITHM, headers={"kid": keys.active.kid})
    return AccessToken(token=token, expires_in=ttl_s)


def issue_access_token(
    keys: KeySet,
    *,
    staff_id: str,
    agency_id: str,
    roles: list[str],
    name: str,
    session_id: str,
    ttl_s: int,
    now: int | None = None,
) -> AccessToken:
    return _sign(
        keys, ttl_s, now, sub=staff_id, agency_id=agency_id, roles=list(roles), name=name, sid=session_id, kind="staff"
    )


def issue_service_token(
    keys: KeySet, *, client_id: str, agency_id: str, ttl_s: int, now: int | None = None
) -> AccessToken:
    """A service client's access token: agency-scoped, or platform scope with agency_id ""; no session."""
    return _sign(
        keys,
        ttl_s,
        now,
        sub=f"{SERVICE_SUBJECT_PREFIX}{client_id}",
        agency_id=agency_id,
        roles=[ROLE_SERVICE],
        name=client_id,
        kind=KIND_SERVICE,
    )


def new_refresh_token() -> str:
    return secrets.token_urlsafe(REFRESH_TOKEN_BYTES)


def refresh_token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
