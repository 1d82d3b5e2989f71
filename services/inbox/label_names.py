"""Label names at rest. A label's name can be a patient's ("Maria Lopez follow-up"), so it is PHI:
the stored document holds it sealed with the inbox's PhiCipher (record = the label id, field
"name"), like a message subject, and never in clear.

Names are unique per owner regardless of case, which a unique index can enforce only over something
stored: `name_key` is a keyed hash (HMAC-SHA256) of the normalised name (domain.label_name), with a
per-agency key derived, not stored: HKDF-SHA256 of a PHI master key with the context
`label-name-index|<agency>`. Equal names of one owner have equal keys; nothing links a key to its
name, or to the same name in another agency, without the master key. `name_key` names the master
key it was made with (`<master key id>:<hex>`): after a master key rotation, a label still hashed
with the previous key is hashed again when it is next read, as a label written in clear before
names were sealed is sealed then (`Sealed.rewrite`).
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.inbox import domain
from services.kit.crypto import PhiCipher

FIELD = "name"
_SALT = b"clinic-label-name-index-v1"
_INFO = b"label-name-index|"


class NameIndex:
    """Keyed hashes of normalised label names with the active master key, one derived key per agency."""

    def __init__(self, master_key: bytes, master_key_id: str):
        self._master = master_key
        self.active_id = master_key_id
        self._derived: dict[str, bytes] = {}  # agency -> HMAC key
        self._lock = threading.Lock()

    def _key(self, agency_id: str) -> bytes:
        with self._lock:
            key = self._derived.get(agency_id)
            if key is None:
                hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=_INFO + agency_id.encode())
                key = self._derived[agency_id] = hkdf.derive(self._master)
            return key

    def key(self, agency_id: str, normalised: str) -> str:
        """The name's key in this agency, made with the active master key."""
        digest = hmac.new(self._key(agency_id), normalised.encode("utf-8"), hashlib.sha256).hexdigest()
        return f"{self.active_id}:{digest}"

    def current(self, name_key: object) -> bool:
        """True when a stored key was made with the active master key (anything else is rewritten)."""
        return isinstance(name_key, str) and name_key.startswith(f"{self.active_id}:")


@dataclass(frozen=True)
class Sealed:
    """A stored label's name in clear, and the fields to write back when the document is not in
    today's shape (a clear name, or a key of another master key); None when it is."""

    name: str
    rewrite: dict | None


class LabelNames:
    """Seals label names for storage and opens stored ones."""

    def __init__(self, cipher: PhiCipher):
        self.cipher = cipher
        keyring = cipher.keyring
        self.index = NameIndex(keyring.master_keys[keyring.active_master_id], keyring.active_master_id)

    def fields(self, agency_id: str, owner: str, label_id: str, name: str) -> dict:
        """What a label document stores about its (already normalised) name: `name` sealed,
        `name_key` and `owner_name` (the owner's unique key) hashed."""
        name_key = self.index.key(agency_id, domain.label_key(name))
        return {
            "name": self.cipher.seal(agency_id, label_id, FIELD, name),
            "name_key": name_key,
            "owner_name": f"{owner}|{name_key}",
        }

    def stale(self, label: dict) -> bool:
        """True when a stored label is not in today's shape (its name in clear, or its key made with
        another master key), without opening it."""
        return isinstance(label.get("name"), str) or not self.index.current(label.get("name_key"))

    def open(self, label: dict) -> Sealed:
        agency_id = label.get("agency_id") or label["owner"].split("|", 1)[0]
        stored = label["name"]
        if isinstance(stored, str):  # written in clear before names were sealed
            name = stored
        else:
            name = self.cipher.open(agency_id, label["_id"], FIELD, stored)
        if self.stale(label):
            return Sealed(name, self.fields(agency_id, label["owner"], label["_id"], name))
        return Sealed(name, None)
