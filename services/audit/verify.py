"""Verification of the audit trail: every chain, every link, every checkpoint signature.

For each chain, in seq order: each record is where its id says (`seq` 1, 2, 3 ... with no gap),
its columns match its content, its hash is SHA-256(prev_hash + content) and its prev_hash is the
hash of the record before it (services.audit.chain.record_problem). Each checkpoint must carry a
valid signature by a trusted key, match the hash of the record it names, and name a record that
exists (a checkpoint past the end of a chain means records were removed from its end).

The report names the first broken link of each chain: its seq, the id of the record at that
place, and what is wrong. `python -m services.audit verify` exits 1 when any chain is broken.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.audit import chain as chains
from services.audit.signing import TrustedKeys
from services.audit.store import AuditStore

# What the report says for each problem.
PROBLEMS = {
    "missing_record": "no record at this place of the chain (removed, or never written)",
    "record_out_of_place": "the record found here carries another place (id, chain or seq)",
    "fields_missing_or_malformed": "the record lacks fields of its content or holds the wrong types",
    "fields_differ_from_content": "the record's fields differ from its hashed content (changed in place)",
    "hash_mismatch": "the record's hash is not SHA-256(prev_hash + content)",
    "prev_hash_mismatch": "the record does not link to the record before it (that one or this one was changed)",
    "hash_differs_from_checkpoint": "the record's hash differs from the signed checkpoint of its place",
    "checkpoint_signature_invalid": "the checkpoint's signature is not valid for a trusted key",
    "records_missing_at_end": "a signed checkpoint names a record past the end of the chain (records removed)",
}


@dataclass(frozen=True)
class Broken:
    chain: str
    seq: int
    record_id: str
    problem: str

    @property
    def explanation(self) -> str:
        return PROBLEMS[self.problem]

    def as_dict(self) -> dict:
        return {
            "chain": self.chain,
            "seq": self.seq,
            "record_id": self.record_id,
            "problem": self.problem,
            "explanation": self.explanation,
        }


@dataclass(frozen=True)
class ChainReport:
    chain: str
    records: int
    checkpoints: int
    head_seq: int
    head_hash: str
    broken: Broken | None

    @property
    def intact(self) -> bool:
        return self.broken is None

    def as_dict(self) -> dict:
        return {
            "chain": self.chain,
            "intact": self.intact,
            "records": self.records,
            "checkpoints": self.checkpoints,
            "head": {"seq": self.head_seq, "hash": self.head_hash},
            "broken": None if self.broken is None else self.broken.as_dict(),
        }


def _checkpoint_problems(chain: str, checkpoints: list[dict], trusted: TrustedKeys) -> list[Broken]:
    problems = []
    for cp in checkpoints:
        seq, at = cp["seq"], cp.get("at")
        valid = isinstance(at, int) and cp.get("chain") == chain
        if valid:
            text = chains.checkpoint_text(chain, int(seq), str(cp.get("hash")), int(at), str(cp.get("key_id")))
            valid = trusted.verify(str(cp.get("key_id")), text, cp.get("signature"))
        if not valid:
            problems.append(Broken(chain, seq, chains.record_id(chain, seq), "checkpoint_signature_invalid"))
    return problems


def verify_chain(chain: str, records: Iterable[dict], checkpoints: Iterable[dict], trusted: TrustedKeys) -> ChainReport:
    """Walk `records` (in seq order) and `checkpoints` of one chain; the first broken link, if any."""
    cps = [cp for cp in checkpoints if isinstance(cp.get("seq"), int) and not isinstance(cp.get("seq"), bool)]
    problems = _checkpoint_problems(chain, cps, trusted)
    signed_hash = {cp["seq"]: cp.get("hash") for cp in cps}
    prev_hash, seq, count = chains.GENESIS, 0, 0
    for doc in records:
        count += 1
        expected = seq + 1
        if doc.get("seq") != expected and isinstance(doc.get("seq"), int) and doc["seq"] > expected:
            problems.append(Broken(chain, expected, chains.record_id(chain, expected), "missing_record"))
            break
        problem = chains.record_problem(doc, chain, expected, prev_hash)
        if problem is None and expected in signed_hash and signed_hash[expected] != doc["hash"]:
            problem = "hash_differs_from_checkpoint"
        if problem is not None:
            problems.append(Broken(chain, expected, str(doc.get("_id")), problem))
            break
        prev_hash, seq = doc["hash"], expected
    else:
        beyond = [cp_seq for cp_seq in signed_hash if cp_seq > seq]
        if beyond:
            problems.append(Broken(chain, seq + 1, chains.record_id(chain, seq + 1), "records_missing_at_end"))
    first = min(problems, key=lambda b: b.seq) if problems else None
    return ChainReport(chain, count, len(cps), seq, prev_hash, first)


def verify_store(store: AuditStore, trusted: TrustedKeys, only: Iterable[str] | None = None) -> list[ChainReport]:
    """Every chain of the store (or those in `only`), one report each."""
    names = sorted(set(only)) if only is not None else store.all_chains()
    return [verify_chain(name, store.chain_records(name), store.checkpoints_of(name), trusted) for name in names]
