"""Idempotent creates: a caller's `Idempotency-Key` names at most one thing they created.

Messages (mailbox.py), reminders, signature requests and announcements share one record per key
(`idempotency_keys`, InboxStore.claim_idempotency_key): its `_id` is a digest of the caller's
agency, the caller and the key, so keys are per caller and two callers never meet; it holds the
id of the object the key made (in the field `message_id`, whatever the object) and the
fingerprint of the request that made it. A create with a key

1. asks whether an earlier request already bound the key (`earlier`): a different request under
   it is refused, 409 `idempotency_key_reused`; the same one is answered with the stored object
   (200, the same id) before anything else is checked or called;
2. binds the key to a new id in one insert (`claim`), which answers the id bound first when a
   concurrent request with the key got there before it;
3. writes the object under that id; a duplicate-key failure there means a concurrent repeat wrote
   it first, and the stored one is answered.

A crash between 2 and 3 leaves the key bound to an id with no object: the retry creates it under
that id. Keys are kept as long as the inbox database (no expiry).
"""

from __future__ import annotations

from services.inbox import domain
from services.inbox.store import InboxStore
from services.kit.auth import Identity
from services.kit.errors import Conflict


def reused() -> Conflict:
    return Conflict("idempotency_key_reused", "this Idempotency-Key was used for a different request")


class IdempotentCreate:
    """One create under the caller's key (or without one: every step then makes a new object)."""

    def __init__(self, store: InboxStore, caller: Identity, key: str | None, kind: str, *fields: object):
        self.store = store
        self.record_id = domain.digest(caller.agency_id, caller.staff_id, key) if key else None
        self.fingerprint = domain.create_digest(kind, *fields)

    def earlier(self) -> str | None:
        """The id an earlier request under this key bound it to; None without a key or when unused."""
        if self.record_id is None:
            return None
        record = self.store.idempotency_record(self.record_id)
        return self._checked(record) if record is not None else None

    def claim(self, new_id: str) -> str:
        """The id to create under: `new_id`, or the one an earlier (or concurrent) request bound the key to."""
        if self.record_id is None:
            return new_id
        return self._checked(self.store.claim_idempotency_key(self.record_id, new_id, self.fingerprint))

    def _checked(self, record: dict) -> str:
        if record["draft"] != self.fingerprint:
            raise reused()
        return record["message_id"]
