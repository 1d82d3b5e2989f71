"""The audit service's checkpoint keys: Ed25519, so anyone holding the public key can check that a
checkpoint (chain, seq, hash, time) was written by the audit service and not since changed.

- `SigningKey`: the active private key (AUDIT_SIGNING_KEY, PKCS#8 PEM). Its `key_id` is derived
  from the public key ("ed25519-" + the first 16 hex digits of the SHA-256 of its 32 raw bytes),
  so it names the key without any registry.
- `TrustedKeys`: the public keys a verification accepts: the active one plus retired ones
  (AUDIT_TRUSTED_PUBLIC_KEYS, PEM), or only the ones an auditor brings (`verify --public-key`).

A signature is base64 (standard alphabet) of the Ed25519 signature over the ASCII text of
services.audit.chain.checkpoint_text, so `openssl pkeyutl -verify -rawin` checks it by hand.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

_PEM_BLOCK = re.compile(r"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.S)


def generate_private_pem() -> str:
    """A new Ed25519 private key as PKCS#8 PEM (development keys; production brings its own)."""
    return (
        Ed25519PrivateKey.generate()
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode("ascii")
    )


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    return "ed25519-" + hashlib.sha256(_raw(public_key)).hexdigest()[:16]


def public_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(
        "ascii"
    )


def public_jwk(public_key: Ed25519PublicKey) -> dict:
    """RFC 8037 form of the key, with its id."""
    x = base64.urlsafe_b64encode(_raw(public_key)).rstrip(b"=").decode("ascii")
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": key_id(public_key), "alg": "EdDSA", "use": "sig"}


@dataclass(frozen=True)
class SigningKey:
    private_key: Ed25519PrivateKey

    @classmethod
    def from_pem(cls, pem: str) -> SigningKey:
        """ValueError unless `pem` is an unencrypted Ed25519 private key."""
        try:
            key = serialization.load_pem_private_key(pem.strip().encode("ascii") + b"\n", password=None)
        except (TypeError, ValueError, UnicodeEncodeError) as exc:
            raise ValueError("not an unencrypted PEM private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("not an Ed25519 key")
        return cls(key)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def sign(self, text: str) -> str:
        return base64.b64encode(self.private_key.sign(text.encode("ascii"))).decode("ascii")


def load_public_keys(pem_text: str) -> list[Ed25519PublicKey]:
    """Every Ed25519 public key in a PEM bundle; ValueError for a block that is not one."""
    keys = []
    for block in _PEM_BLOCK.findall(pem_text or ""):
        try:
            key = serialization.load_pem_public_key(block.encode("ascii"))
        except (TypeError, ValueError, UnicodeEncodeError) as exc:
            raise ValueError("not a PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        keys.append(key)
    if (pem_text or "").strip() and not keys:
        raise ValueError("no PEM public key found")
    return keys


class TrustedKeys:
    """The public keys a checkpoint may be signed with, by key id."""

    def __init__(self, keys: Iterable[Ed25519PublicKey]):
        self.keys = {key_id(key): key for key in keys}

    def verify(self, key: str, text: str, signature: str) -> bool:
        """Whether `signature` over `text` is valid for the trusted key named `key`."""
        public_key = self.keys.get(key)
        if public_key is None or not isinstance(signature, str) or not isinstance(text, str):
            return False
        try:
            public_key.verify(base64.b64decode(signature, validate=True), text.encode("ascii"))
        except (InvalidSignature, binascii.Error, ValueError, UnicodeEncodeError):
            return False
        return True
