"""Verification of the audit trail: every chain, every link, every checkpoint, and the witness.

For each chain, in seq order: each record is where its id says (`seq` 1, 2, 3 ... with no gap),
its columns match its content, its hash is SHA-256(prev_hash + content) and its prev_hash is the
hash of the record before it (services.audit.chain.record_problem). Each checkpoint must be well
formed (a checkpoint whose fields were changed to other types is a problem, never skipped), carry
a valid signature by a trusted key, match the hash of the record it names, and name a record that
exists (a checkpoint past the end of a chain means records were removed from its end).

With a witness (services.audit.witness, read from outside the database): the record at the
newest seq the witness saw of each chain must still be there with the witnessed hash (else the
chain was `truncated` or `rewritten`), and every chain the witness names must still exist
(`chain_missing`). This is what catches a tail removed together with its checkpoints, or a whole
chain removed with its checkpoints and registration.

Warnings (the trail may be intact, but something that should vouch for it is not keeping up):
records recorded more than `overdue_ms` ago that no signed checkpoint covers yet, or that are past
the newest head the witness saw.

The report names the first broken link of each chain: its seq, the id of the record at that
place, and what is wrong. `python -m services.audit verify` exits 1 when any chain is broken or
the witness file has a problem.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from services.audit import chain as chains
from services.audit.signing import TrustedKeys
from services.audit.store import AuditStore
from services.audit.witness import WitnessReading

# What the report says for each problem.
PROBLEMS = {
    "missing_record": "no record at this place of the chain (removed, or never written)",
    "record_out_of_place": "the record found here carries another place (id, chain or seq)",
    "fields_missing_or_malformed": "the record lacks fields of its content or holds the wrong types",
    "fields_differ_from_content": "the record's fields differ from its hashed content (changed in place)",
    "hash_mismatch": "the record's hash is not SHA-256(prev_hash + content)",
    "prev_hash_mismatch": "the record does not link to the record before it (that one or this one was changed)",
    "hash_differs_from_checkpoint": "the record's hash differs from the signed checkpoint of its place",
    "checkpoint_malformed": "a checkpoint of this chain lacks fields or holds the wrong types (changed)",
    "checkpoint_signature_invalid": "the checkpoint's signature is not valid for a trusted key",
    "records_missing_at_end": "a signed checkpoint names a record past the end of the chain (records removed)",
    "rewritten": "the record's hash differs from the one the witness file saw at this place (the chain was rewritten)",
    "truncated": "the witness file saw this chain reach a later seq: records were removed from its end",
    "chain_missing": "the witness file names this chain but the database holds none of its records (chain removed)",
}
WARNINGS = {
    "checkpoint_overdue": "records recorded long ago are not covered by a signed checkpoint yet "
    "(the checkpoint pass is not running, or checkpoints were removed)",
    "not_witnessed": "records recorded long ago are past the newest head the witness file saw "
    "(the witness is not being written, or this is not the service's witness file)",
}
# Records are "long ago" (a warning when uncovered) after this many checkpoint intervals.
OVERDUE_INTERVALS = 3


def overdue_after_ms(checkpoint_interval_s: float) -> int:
    return int(OVERDUE_INTERVALS * checkpoint_interval_s * 1000)


# A checkpoint's `_id` is its record's id: the place a malformed checkpoint claimed.
_CHECKPOINT_ID = re.compile(r"^(?P<chain>.+):(?P<seq>[0-9]{12})$")


@dataclass(frozen=True)
class Broken:
    """A problem (or, with a WARNINGS code, a warning) at one place of a chain."""

    chain: str
    seq: int
    record_id: str
    problem: str
    detail: str = ""

    @property
    def explanation(self) -> str:
        return {**PROBLEMS, **WARNINGS}[self.problem]

    def as_dict(self) -> dict:
        return {
            "chain": self.chain,
            "seq": self.seq,
            "record_id": self.record_id,
            "problem": self.problem,
            "explanation": self.explanation,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class ChainReport:
    chain: str
    records: int
    checkpoints: int
    head_seq: int
    head_hash: str
    broken: Broken | None
    warnings: tuple[Broken, ...] = ()

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
            "warnings": [w.as_dict() for w in self.warnings],
        }


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _well_formed(chain: str, cp: Mapping) -> bool:
    return (
        cp.get("chain") == chain
        and _is_int(cp.get("seq"))
        and cp["seq"] >= 1
        and isinstance(cp.get("hash"), str)
        and _is_int(cp.get("at"))
        and isinstance(cp.get("key_id"), str)
        and isinstance(cp.get("signature"), str)
    )


def _claimed_seq(cp: Mapping) -> int:
    """The place a malformed checkpoint stood for: its seq, else the one in its id, else 0."""
    if _is_int(cp.get("seq")):
        return int(cp["seq"])
    found = _CHECKPOINT_ID.fullmatch(str(cp.get("_id", "")))
    return int(found["seq"]) if found else 0


def _checkpoints(chain: str, checkpoints: list[Mapping], trusted: TrustedKeys) -> tuple[list[Broken], dict[int, str]]:
    """The problems of a chain's checkpoints, and the hash each well-formed one gives its seq."""
    problems, signed_hash = [], {}
    for cp in checkpoints:
        if not _well_formed(chain, cp):
            seq = _claimed_seq(cp)
            problems.append(Broken(chain, seq, chains.record_id(chain, seq), "checkpoint_malformed"))
            continue
        seq = int(cp["seq"])
        signed_hash[seq] = cp["hash"]
        text = chains.checkpoint_text(chain, seq, cp["hash"], int(cp["at"]), cp["key_id"])
        if not trusted.verify(cp["key_id"], text, cp["signature"]):
            problems.append(Broken(chain, seq, chains.record_id(chain, seq), "checkpoint_signature_invalid"))
    return problems, signed_hash


def verify_chain(  # noqa: PLR0913 - the chain, what vouches for it, and when "long ago" is
    chain: str,
    records: Iterable[dict],
    checkpoints: Iterable[Mapping],
    trusted: TrustedKeys,
    *,
    witnessed: tuple[int, str] | None = None,
    now: int | None = None,
    overdue_ms: int | None = None,
) -> ChainReport:
    """Walk `records` (in seq order) and `checkpoints` of one chain; the first broken link, if any.

    `witnessed`: the newest (seq, hash) the witness saw of this chain ((0, GENESIS) when a witness is
    read but never named it; None without a witness). `now` and `overdue_ms`: warn about records
    recorded before `now - overdue_ms` that no checkpoint, or no witness line, covers."""
    checkpoints = list(checkpoints)
    problems, signed_hash = _checkpoints(chain, checkpoints, trusted)
    bad_signatures = {b.seq for b in problems if b.problem == "checkpoint_signature_invalid"}
    last_signed = max((s for s in signed_hash if s not in bad_signatures), default=0)
    witness_seq, witness_hash = witnessed if witnessed is not None else (0, "")
    # The first record each of them should cover next, and when it was recorded.
    first_after = {last_signed + 1: None, witness_seq + 1: None}
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
        if problem is None and expected == witness_seq and witness_hash != doc["hash"]:
            problem = "rewritten"
        if problem is not None:
            problems.append(Broken(chain, expected, str(doc.get("_id")), problem))
            break
        if expected in first_after:
            first_after[expected] = doc["recorded_at"]
        prev_hash, seq = doc["hash"], expected
    else:
        problems.extend(_missing_at_end(chain, seq, count, signed_hash, witness_seq))
    warnings = []
    if now is not None and overdue_ms is not None:
        overdue = [("checkpoint_overdue", last_signed + 1)]
        if witnessed is not None:
            overdue.append(("not_witnessed", witness_seq + 1))
        for code, first in overdue:
            recorded = first_after.get(first)
            if first <= seq and recorded is not None and recorded < now - overdue_ms:
                warnings.append(Broken(chain, first, chains.record_id(chain, first), code))
    first = min(problems, key=lambda b: b.seq) if problems else None
    return ChainReport(chain, count, len(checkpoints), seq, prev_hash, first, tuple(warnings))


def _missing_at_end(chain: str, seq: int, count: int, signed_hash: Mapping[int, str], witness_seq: int) -> list:
    """What vouches for records past the last one (`seq`): a checkpoint, or the witness."""
    found = []
    if any(cp_seq > seq for cp_seq in signed_hash):
        found.append(Broken(chain, seq + 1, chains.record_id(chain, seq + 1), "records_missing_at_end"))
    if witness_seq > seq:
        problem = "chain_missing" if count == 0 else "truncated"
        found.append(
            Broken(chain, seq + 1, chains.record_id(chain, seq + 1), problem, f"the witness saw seq {witness_seq}")
        )
    return found


def verify_store(  # noqa: PLR0913 - what to check, against what, and when "long ago" is
    store: AuditStore,
    trusted: TrustedKeys,
    only: Iterable[str] | None = None,
    *,
    witness: WitnessReading | None = None,
    now: int | None = None,
    overdue_ms: int | None = None,
) -> list[ChainReport]:
    """Every chain of the store and of the witness (or those in `only`), one report each."""
    if only is not None:
        names = set(only)
    else:
        names = set(store.all_chains()) | (set(witness.heads) if witness is not None else set())
    return [
        verify_chain(
            name,
            store.chain_records(name),
            store.checkpoints_of(name),
            trusted,
            witnessed=None if witness is None else witness.head(name),
            now=now,
            overdue_ms=overdue_ms,
        )
        for name in sorted(names)
    ]
