"""Signed checkpoints: every `every` records of a chain, and on a timer for a chain that grew.

A checkpoint {chain, seq, hash, at, key_id, signature} vouches, with the audit service's Ed25519
key, that record `seq` of `chain` had `hash` at time `at`. Everything up to `seq` is covered by
the hash chain itself; the checkpoint is what shows that records were not removed from the end
of a chain, or a whole chain rewritten, by someone who can write the database but does not hold
the key. Replicas writing the same checkpoint store it once (its `_id` is the record's id).

Checkpoints live in the database, so whoever can write it can also remove them with the records
they name. Each pass therefore also appends the heads of every chain to the witness file outside
the database (services.audit.witness), at least every `interval_s`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from services.audit import chain as chains
from services.audit.signing import SigningKey
from services.audit.store import AuditStore, Head
from services.audit.witness import Witness
from services.kit.mongo import now_ms
from services.kit.runtime import every

log = logging.getLogger(__name__)


def signed_checkpoint(key: SigningKey, chain: str, seq: int, hash_: str, at: int) -> dict:
    text = chains.checkpoint_text(chain, seq, hash_, at, key.key_id)
    return {
        "_id": chains.record_id(chain, seq),
        "chain": chain,
        "seq": seq,
        "hash": hash_,
        "at": at,
        "key_id": key.key_id,
        "signature": key.sign(text),
    }


class Checkpointer:
    def __init__(
        self,
        store: AuditStore,
        key: SigningKey | None,
        *,
        every_records: int,
        interval_s: float,
        witness: Witness | None = None,
    ):
        self.store = store
        self.key = key
        self.every_records = every_records
        self.interval_s = interval_s
        self.witness = witness
        # The heads this process last witnessed: a chain stays watched even if its registration goes.
        self._witnessed: dict[str, Head] = {}

    def checkpoint(self, chain: str, seq: int, hash_: str) -> dict | None:
        """Sign and store a checkpoint of record `seq`; None without a signing key."""
        if self.key is None:
            return None
        checkpoint = signed_checkpoint(self.key, chain, seq, hash_, now_ms())
        if self.store.add_checkpoint(checkpoint):
            log.info("checkpoint signed", extra={"agency_id": chain, "collection": "audit_checkpoints"})
        return checkpoint

    def after_append(self, records: Iterable[dict]) -> None:
        """Checkpoint the records that complete a run of `every_records` in their chain."""
        for record in records:
            if record["seq"] % self.every_records == 0:
                self.checkpoint(record["chain"], record["seq"], record["hash"])

    def run_pass(self) -> int:
        """Checkpoint the head of every chain that grew since its last checkpoint, then witness the
        heads of every chain; how many checkpoints were signed."""
        signed = 0
        heads: dict[str, Head] = {}
        for chain in sorted({*self.store.registered_chains(), *self._witnessed}):
            head = self.store.head(chain)
            self._watch(chain, head)
            if head.seq == 0:
                continue
            heads[chain] = head
            last = self.store.last_checkpoint(chain)
            if last is None or last["seq"] < head.seq:
                self.checkpoint(chain, head.seq, head.hash)
                signed += 1
        if self.witness is not None and self.key is not None:
            self.witness.append({chain: (head.seq, head.hash) for chain, head in heads.items()}, now_ms())
            self._witnessed.update(heads)
        return signed

    def _watch(self, chain: str, head: Head) -> None:
        """A chain never shrinks: one shorter than this process last witnessed was cut in the database."""
        seen = self._witnessed.get(chain)
        if seen is not None and head.seq < seen.seq:
            log.error(
                "audit chain shorter than last witnessed: records were removed (run verify)",
                extra={"agency_id": chain, "code": "chain_truncated", "count": seen.seq - head.seq},
            )

    def run(self, stop: threading.Event) -> None:
        """The background worker: a pass every `interval_s` until the process stops."""
        every(stop, self.interval_s, self.run_pass, "checkpoint")
