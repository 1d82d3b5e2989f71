"""The audit trail's hash chain: what a record says, how records link, how a link is checked.

Pure functions, shared by the writer (services.audit.store), the verifier (services.audit.verify)
and the tests, so the three can never disagree about a byte.

Records are grouped in chains: one per agency (the chain id is the agency id) and `SYSTEM_CHAIN`
for events that name no agency (a forged identity refused before anyone is known). A record is

    _id        "<chain>:<seq, 12 digits>"
    seq        1, 2, 3 ... within its chain, without gaps
    content    the canonical text of the record's fields (below)
    prev_hash  the previous record's hash; GENESIS for seq 1
    hash       hex SHA-256 of the ASCII text  prev_hash + content
    ...        the fields of `content` again, as columns to query, plus `at_key`

The canonical text is JSON with sorted keys, no spaces and only ASCII (json.dumps with
sort_keys=True, separators=(",", ":"), ensure_ascii=True) of the `CONTENT_FIELDS`: strings and
integers only, so any language reproduces it. `chain` and `seq` are part of it, so a record moved
to another place of the trail no longer matches its hash.

`at_key` = "<occurred_at, 13 digits>.<seq, 12 digits>" is the indexed, unique sort key that
queries page by (newest first) and that time ranges are ranges of; `rec_key`, the same built on
`recorded_at`, is the key of questions about when records were recorded (version 2 on).

Versions (`v`, inside the hashed content, so a record cannot be passed off as another version):
1 is the first form; 2 adds `clock_skew_ms` (how far the producer's `occurred_at` was from the
audit service's receipt time, 0 when within AUDIT_MAX_CLOCK_SKEW_S) and the `rec_key` column. New
records are written in `CONTENT_VERSION`; verification checks every version it knows.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

CONTENT_VERSION = 2
CHECKPOINT_VERSION = 1  # the form of a checkpoint's signed text, independent of the records'
GENESIS = "0" * 64
SYSTEM_CHAIN = "_system"
# Agency ids are [A-Za-z0-9_-]; one that starts with "_" could pass for the system chain.
AGENCY_ID = re.compile(r"^[A-Za-z0-9-][A-Za-z0-9_-]{0,63}$")
MAX_TEXT = 200
# Epoch ms with 13 digits (2001-09-09 .. 2286-11-20): `at_key` sorts as text.
EARLIEST_MS, LATEST_MS = 10**12, 10**13 - 1

CATEGORY_PHI = "phi_access"
CATEGORY_SECURITY = "security"

# What an event says, in the order a CSV export shows it.
ENTRY_TEXT_FIELDS = (
    "event_id",
    "event_type",
    "category",
    "agency_id",
    "producer",
    "service",
    "actor_id",
    "actor_kind",
    "action",
    "outcome",
    "resource_type",
    "resource_id",
    "patient_id",
    "reason",
    "source",
    "correlation_id",
)
INT_FIELDS_V1 = ("v", "seq", "occurred_at", "recorded_at")
# The hashed fields of each record version; a record of another version is malformed.
CONTENT_FIELDS_BY_VERSION = {
    1: ("chain", *ENTRY_TEXT_FIELDS, *INT_FIELDS_V1),
    2: ("chain", *ENTRY_TEXT_FIELDS, *INT_FIELDS_V1, "clock_skew_ms"),
}
CONTENT_FIELDS = CONTENT_FIELDS_BY_VERSION[CONTENT_VERSION]


def text(value: str, limit: int = MAX_TEXT) -> str:
    """A field as recorded: printable characters only, at most `limit` of them."""
    return "".join(ch for ch in (value or "") if ch.isprintable())[:limit]


@dataclass(frozen=True)
class Entry:
    """One event to record, before it has a place in a chain. Ids and actions, never PHI."""

    event_id: str
    event_type: str
    category: str
    agency_id: str
    occurred_at: int
    producer: str = ""
    service: str = ""
    actor_id: str = ""
    actor_kind: str = ""
    action: str = ""
    outcome: str = ""
    resource_type: str = ""
    resource_id: str = ""
    patient_id: str = ""
    reason: str = ""
    source: str = ""
    correlation_id: str = ""
    # occurred_at minus the audit service's receipt time, when beyond AUDIT_MAX_CLOCK_SKEW_S; else 0.
    clock_skew_ms: int = 0

    @property
    def chain(self) -> str:
        return chain_of(self.agency_id)


def chain_of(agency_id: str) -> str:
    """The chain of an agency's events; SYSTEM_CHAIN when there is no agency. ValueError for an id
    that is not an agency id (it could collide with the system chain or break a record id)."""
    if not agency_id:
        return SYSTEM_CHAIN
    if not AGENCY_ID.fullmatch(agency_id):
        raise ValueError("not an agency id")
    return agency_id


def record_id(chain: str, seq: int) -> str:
    return f"{chain}:{seq:012d}"


def at_key(occurred_at: int, seq: int) -> str:
    return f"{occurred_at:013d}.{seq:012d}"


def rec_key(recorded_at: int, seq: int) -> str:
    return f"{recorded_at:013d}.{seq:012d}"


def time_bound(ms: int) -> str:
    """The `at_key` prefix of an instant: every key of a record at or after it sorts at or after this."""
    return f"{ms:013d}"


def plausible_ms(ms: int) -> bool:
    return EARLIEST_MS <= ms <= LATEST_MS


def _is_int(value: object) -> bool:
    # MongoDB drivers may hand back int subclasses (bson.Int64); a bool is no integer here.
    return isinstance(value, int) and not isinstance(value, bool)


def content_of(fields: Mapping) -> dict:
    """The content fields of a record (or of an entry placed with chain, seq, v and recorded_at), as
    its version `v` defines them; KeyError when one is missing, TypeError when one has the wrong type
    or the version is unknown."""
    version = fields["v"]
    if not _is_int(version) or int(version) not in CONTENT_FIELDS_BY_VERSION:
        raise TypeError("v must be a known record version")
    names = CONTENT_FIELDS_BY_VERSION[int(version)]
    content = {name: fields[name] for name in names}
    for name in names:
        if name == "chain" or name in ENTRY_TEXT_FIELDS:
            if type(content[name]) is not str:
                raise TypeError(f"{name} must be a string")
        elif _is_int(content[name]):
            content[name] = int(content[name])
        else:
            raise TypeError(f"{name} must be an integer")
    return content


def canonical(content: Mapping) -> str:
    return json.dumps(dict(content), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def link_hash(prev_hash: str, content_text: str) -> str:
    """hex SHA-256 of the ASCII text prev_hash + content (reproducible with `sha256sum`)."""
    return hashlib.sha256((prev_hash + content_text).encode("ascii")).hexdigest()


def new_record(entry: Entry, seq: int, prev_hash: str, recorded_at: int) -> dict:
    """The document that places `entry` at `seq` of its chain, after the record whose hash is `prev_hash`."""
    chain = entry.chain
    fields = {**asdict(entry), "chain": chain, "seq": seq, "v": CONTENT_VERSION, "recorded_at": recorded_at}
    content_text = canonical(content_of(fields))
    return {
        "_id": record_id(chain, seq),
        **fields,
        "at_key": at_key(entry.occurred_at, seq),
        "rec_key": rec_key(recorded_at, seq),
        "content": content_text,
        "prev_hash": prev_hash,
        "hash": link_hash(prev_hash, content_text),
    }


def record_problem(doc: Mapping, chain: str, seq: int, prev_hash: str) -> str | None:
    """What is wrong with `doc` as record `seq` of `chain` following a record whose hash is
    `prev_hash`, or None. Checked in this order, so a record changed in place names itself:
    its columns against its content, its content against its hash, then its link to the record
    before it."""
    if doc.get("_id") != record_id(chain, seq) or doc.get("chain") != chain or doc.get("seq") != seq:
        return "record_out_of_place"
    try:
        content_text = canonical(content_of(doc))
    except (KeyError, TypeError):
        return "fields_missing_or_malformed"
    if content_text != doc.get("content") or not _keys_match(doc, seq):
        return "fields_differ_from_content"
    if not isinstance(doc.get("prev_hash"), str) or link_hash(doc["prev_hash"], content_text) != doc.get("hash"):
        return "hash_mismatch"
    if doc["prev_hash"] != prev_hash:
        return "prev_hash_mismatch"
    return None


def _keys_match(doc: Mapping, seq: int) -> bool:
    """The derived sort keys match the content (version 1 records have no `rec_key`)."""
    if doc.get("at_key") != at_key(doc["occurred_at"], seq):
        return False
    return doc["v"] == 1 or doc.get("rec_key") == rec_key(doc["recorded_at"], seq)


def checkpoint_text(chain: str, seq: int, hash_: str, at: int, key_id: str) -> str:
    """What a checkpoint's signature covers: canonical JSON of its fields (ASCII)."""
    return canonical({"v": CHECKPOINT_VERSION, "chain": chain, "seq": seq, "hash": hash_, "at": at, "key_id": key_id})
