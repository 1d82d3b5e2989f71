"""Staff password hashing with argon2id.

"standard" is RFC 9106's low-memory profile (64 MiB, 3 passes). "fast" exists
only so the test suite does not spend minutes hashing; configuration refuses it
in production. Hashes made with other parameters are upgraded at the next
successful login.
"""

from __future__ import annotations

import secrets

import argon2
from argon2 import profiles
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

PROFILES = {
    "standard": profiles.RFC_9106_LOW_MEMORY,
    "fast": profiles.CHEAPEST,
}


class PasswordHasher:
    def __init__(self, profile: str = "standard"):
        self._hasher = argon2.PasswordHasher.from_parameters(PROFILES[profile])
        # Verified against when the username is unknown, so that answer takes as long as a wrong password.
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, password_hash: str | None, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash or self._dummy_hash, password) and password_hash is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def burn_time(self, password: str) -> None:
        """Spend what a real verification costs (unknown or inactive account)."""
        self.verify(None, password)

    def needs_rehash(self, password_hash: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True
