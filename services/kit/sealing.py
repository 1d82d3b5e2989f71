"""Sealed event payloads: an event that carries PHI (a board item's title and summary in
`board_item.delivery_requested.v1`) is encrypted before it is staged, so neither the producer's
outbox document nor the broker's queues ever hold it in clear.

The key is per agency and derived, not stored: HKDF-SHA256 of a master key (PHI_MASTER_KEYS,
which every service already holds) with the agency id as context. Producer and consumer derive
the same key without a shared database, and rotation follows the master key: new events use the
active master key id (named in `Envelope.payload_key_id`), old ones open with the id they name
while it is still listed. The additional authenticated data binds the ciphertext to the event's
id, type, agency, producer and payload type, so a sealed payload moved into another envelope
does not open.

Layout: `Envelope.payload` = nonce (12 bytes) | ciphertext and tag; `payload_key_id` = master key id.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from clinic.events.v1.envelope_pb2 import Envelope

_SALT = b"clinic-event-payload-v1"


class SealError(Exception):
    """A sealed payload cannot be opened (unknown key id, wrong envelope, damaged)."""


class PayloadSealer:
    """Seals and opens event payloads with per-agency keys derived from the master keys."""

    def __init__(self, master_keys: dict[str, bytes], active_id: str):
        if active_id not in master_keys:
            raise ValueError("the active master key id must be one of the master keys")
        self._master = dict(master_keys)
        self.active_id = active_id
        self._derived: dict[tuple[str, str], AESGCM] = {}
        self._lock = threading.Lock()

    def _aead(self, key_id: str, agency_id: str) -> AESGCM:
        with self._lock:
            aead = self._derived.get((key_id, agency_id))
            if aead is None:
                master = self._master.get(key_id)
                if master is None:
                    raise SealError("sealed with a master key that is not configured")
                key = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=agency_id.encode()).derive(master)
                aead = self._derived[(key_id, agency_id)] = AESGCM(key)
            return aead

    @staticmethod
    def _aad(envelope: Envelope) -> bytes:
        parts = (envelope.event_id, envelope.event_type, envelope.agency_id, envelope.producer, envelope.payload_type)
        return "\x1f".join(parts).encode()

    def seal(self, envelope: Envelope) -> Envelope:
        """Encrypt `envelope.payload` in place (once); returns the envelope."""
        if envelope.payload_key_id:
            return envelope
        if not envelope.agency_id:
            raise ValueError("only an agency's events are sealed")
        nonce = os.urandom(12)
        sealed = self._aead(self.active_id, envelope.agency_id).encrypt(nonce, envelope.payload, self._aad(envelope))
        envelope.payload = nonce + sealed
        envelope.payload_key_id = self.active_id
        return envelope

    def open(self, envelope: Envelope) -> bytes:
        """The clear payload of a sealed envelope."""
        blob = bytes(envelope.payload)
        if len(blob) < 12 + 16:
            raise SealError("sealed payload is too short")
        try:
            return self._aead(envelope.payload_key_id, envelope.agency_id).decrypt(
                blob[:12], blob[12:], self._aad(envelope)
            )
        except InvalidTag as exc:
            raise SealError("sealed payload does not open for this envelope") from exc


_sealer: PayloadSealer | None = None
_sealer_lock = threading.Lock()


def configure(master_keys: dict[str, bytes], active_id: str) -> PayloadSealer:
    """Set the process's sealer (the bootstrap does it from the service's settings)."""
    global _sealer  # noqa: PLW0603 - one per process, like the logging configuration
    with _sealer_lock:
        _sealer = PayloadSealer(master_keys, active_id)
        return _sealer


@contextlib.contextmanager
def configured(master_keys: dict[str, bytes], active_id: str) -> Iterator[PayloadSealer]:
    """This process seals and opens with these keys inside the block (a test or benchmark building a
    replica of another stack's service), then with what it had before."""
    global _sealer  # noqa: PLW0603
    with _sealer_lock:
        before = _sealer
    try:
        yield configure(master_keys, active_id)
    finally:
        with _sealer_lock:
            _sealer = before


def sealer() -> PayloadSealer:
    """The process's sealer; when none was configured, one from PHI_MASTER_KEYS / PHI_MASTER_KEY_ID
    (in development the run folder's generated keys, the same every service of the stack reads)."""
    global _sealer  # noqa: PLW0603
    with _sealer_lock:
        if _sealer is None:
            from services.kit.settings import Env, common_settings  # noqa: PLC0415 - only when unconfigured

            env = Env("events")
            common = common_settings(env)
            env.done()
            _sealer = PayloadSealer(common.phi_master_keys, common.phi_master_key_id)
        return _sealer
