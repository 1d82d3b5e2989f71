"""Encryption of protected health information at rest.

Envelope encryption: each agency has data keys (AES-256-GCM) stored in the
service's own database, wrapped by a master key that never touches the
database (from the environment in production, generated into the run folder
in development). Every ciphertext names the data key that sealed it, so keys
rotate without re-encrypting old data: new writes use the newest key, reads use
whichever key the ciphertext names. The additional authenticated data binds a
ciphertext to its agency, record and field, so a sealed value copied to another
record or agency fails to open.

Ciphertext layout (bytes): version 0x01 | key-id length (1 byte) | key id (utf-8) | nonce (12) | ciphertext+tag

Every field opened is counted (services.kit.metrics `clinic_phi_decryptions_total`) by the field's
kind (`attachment.2.0` counts as `attachment`) and outcome, never by agency or record.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from services.kit import metrics
from services.kit.mongo import now_ms

VERSION = 1
DATA_KEYS = "phi_data_keys"
# One key per agency for blind search tokens (services/inbox/search.py), wrapped like a data key.
SEARCH_KEYS = "phi_search_keys"


class DecryptionError(Exception):
    """The ciphertext cannot be opened (wrong key, record, field or agency, or damaged)."""


class KeyRing:
    """Per-agency data keys in `phi_data_keys`, wrapped with the master key."""

    def __init__(
        self,
        db: Database,
        master_keys: dict[str, bytes],
        active_master_id: str,
        *,
        active_ttl_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if active_master_id not in master_keys:
            raise ValueError("the active master key id must be one of the master keys")
        self.collection = db[DATA_KEYS]
        self.search_keys = db[SEARCH_KEYS]
        self.master_keys = master_keys
        self.active_master_id = active_master_id
        self._plain: dict[str, bytes] = {}
        self._search: dict[str, bytes] = {}  # agency -> search key (never used as a data key)
        self._active: dict[str, tuple[str, float]] = {}  # agency -> (key id, when it was read)
        self.active_ttl_s = active_ttl_s
        self._clock = clock
        self._lock = threading.Lock()

    def ensure_indexes(self) -> None:
        self.collection.create_index([("agency_id", 1), ("generation", -1)])

    def _wrap(self, key_id: str, agency_id: str, plain: bytes) -> dict:
        nonce = os.urandom(12)
        sealed = AESGCM(self.master_keys[self.active_master_id]).encrypt(nonce, plain, f"{agency_id}|{key_id}".encode())
        return {"master_key_id": self.active_master_id, "wrapped": nonce + sealed}

    def _unwrap(self, doc: dict) -> bytes:
        master = self.master_keys.get(doc["master_key_id"])
        if master is None:
            raise DecryptionError(f"master key {doc['master_key_id']!r} is not configured")
        wrapped = bytes(doc["wrapped"])
        try:
            return AESGCM(master).decrypt(wrapped[:12], wrapped[12:], f"{doc['agency_id']}|{doc['_id']}".encode())
        except InvalidTag as exc:
            raise DecryptionError("data key cannot be unwrapped") from exc

    def key(self, key_id: str) -> bytes:
        with self._lock:
            plain = self._plain.get(key_id)
        if plain is not None:
            return plain
        doc = self.collection.find_one({"_id": {"$eq": key_id}})
        if doc is None:
            raise DecryptionError("unknown data key")
        plain = self._unwrap(doc)
        with self._lock:
            self._plain[key_id] = plain
        return plain

    def _newest(self, agency_id: str) -> dict | None:
        found = list(self.collection.find({"agency_id": {"$eq": agency_id}}).sort("generation", -1).limit(1))
        return found[0] if found else None

    def active_key(self, agency_id: str) -> tuple[str, bytes]:
        """The key new writes use. Re-read at most every `active_ttl_s`, so a rotation made by
        another process (`python -m services.kit.keys rotate`) reaches running replicas."""
        now = self._clock()
        with self._lock:
            key_id, checked_at = self._active.get(agency_id, (None, 0.0))
        if key_id is None or now - checked_at > self.active_ttl_s:
            newest = self._newest(agency_id)
            key_id = newest["_id"] if newest else self.rotate(agency_id)
            with self._lock:
                self._active[agency_id] = (key_id, now)
        return key_id, self.key(key_id)

    def rotate(self, agency_id: str) -> str:
        """Create the agency's next data key and make it the one new writes use."""
        newest = self._newest(agency_id)
        generation = newest["generation"] + 1 if newest else 1
        key_id = f"{agency_id}:{generation}"
        doc = {"_id": key_id, "agency_id": agency_id, "generation": generation, "created_at": now_ms()}
        doc.update(self._wrap(key_id, agency_id, AESGCM.generate_key(bit_length=256)))
        try:
            self.collection.insert_one(doc)
        except DuplicateKeyError:
            pass  # another process created this generation first; both use theirs
        with self._lock:
            self._active[agency_id] = (key_id, self._clock())
        return key_id

    def search_key(self, agency_id: str) -> bytes:
        """The agency's key of blind search tokens: random, made on first use and wrapped by the
        master key like a data key (`_id` `<agency>:search`). Data-key rotation leaves it as it is,
        so stored tokens stay valid; `rewrap_all` re-wraps it after a master key rotation. Two
        processes making it at once both end up with the one stored first."""
        key_id = f"{agency_id}:search"
        with self._lock:
            plain = self._search.get(agency_id)
        if plain is not None:
            return plain
        doc = self.search_keys.find_one({"_id": {"$eq": key_id}})
        if doc is None:
            made = {"_id": key_id, "agency_id": agency_id, "created_at": now_ms()}
            made.update(self._wrap(key_id, agency_id, os.urandom(32)))
            try:
                self.search_keys.insert_one(made)
                doc = made
            except DuplicateKeyError:
                doc = self.search_keys.find_one({"_id": {"$eq": key_id}})
        plain = self._unwrap(doc)
        with self._lock:
            self._search[agency_id] = plain
        return plain

    def rewrap_all(self) -> int:
        """Re-wrap every data key (and search key) with the active master key (master key rotation)."""
        count = 0
        for collection in (self.collection, self.search_keys):
            for doc in collection.find({"master_key_id": {"$ne": self.active_master_id}}):
                plain = self._unwrap(doc)
                collection.update_one(
                    {"_id": {"$eq": doc["_id"]}}, {"$set": self._wrap(doc["_id"], doc["agency_id"], plain)}
                )
                count += 1
        return count


class PhiCipher:
    """Seals and opens PHI fields for one agency at a time."""

    def __init__(self, keyring: KeyRing):
        self.keyring = keyring

    @staticmethod
    def _aad(agency_id: str, record_id: str, field: str) -> bytes:
        return f"{agency_id}|{record_id}|{field}".encode()

    def seal(self, agency_id: str, record_id: str, field: str, plaintext: str) -> bytes:
        key_id, key = self.keyring.active_key(agency_id)
        nonce = os.urandom(12)
        sealed = AESGCM(key).encrypt(nonce, plaintext.encode("utf-8"), self._aad(agency_id, record_id, field))
        encoded_id = key_id.encode()
        return bytes([VERSION, len(encoded_id)]) + encoded_id + nonce + sealed

    def open(self, agency_id: str, record_id: str, field: str, blob: bytes) -> str:
        try:
            plain = self._open(agency_id, record_id, field, blob)
        except DecryptionError:
            metrics.phi_decryption(field, "failed")
            raise
        metrics.phi_decryption(field, "ok")
        return plain

    def _open(self, agency_id: str, record_id: str, field: str, blob: bytes) -> str:
        blob = bytes(blob)
        if len(blob) < 2 or blob[0] != VERSION:
            raise DecryptionError("unknown ciphertext format")
        id_len = blob[1]
        key_id = blob[2 : 2 + id_len].decode()
        if not key_id.startswith(f"{agency_id}:"):
            raise DecryptionError("ciphertext belongs to another agency")
        rest = blob[2 + id_len :]
        try:
            plain = AESGCM(self.keyring.key(key_id)).decrypt(
                rest[:12], rest[12:], self._aad(agency_id, record_id, field)
            )
        except InvalidTag as exc:
            raise DecryptionError("ciphertext does not open for this record") from exc
        return plain.decode("utf-8")
