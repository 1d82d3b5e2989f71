"""The witness: a signed line of every chain's head, appended outside the database.

The hash chain shows a record changed or removed in the middle, and signed checkpoints show a
checkpointed record changed. Neither shows records removed from the end of a chain together with
the checkpoints that named them, nor a whole chain removed with its checkpoints and registration:
whoever can write the database can delete what vouches for it there. So at every checkpoint pass
the service appends one line to a file that is not in the database (AUDIT_WITNESS_PATH; in
production write-once storage, an object-lock bucket or a file shipped off-host as it grows):

    {"at":<ms>,"db":"<database>","heads":{"<chain>":[<seq>,"<hash>"],...},"key_id":"ed25519-…","signature":"…","v":1}

`heads` holds the head of every chain, `db` the audit database it describes, and `signature` is
base64 of the Ed25519 signature (the checkpoint key) over the canonical JSON of the line without
`signature` (sorted keys, no spaces, ASCII; services.audit.chain.canonical). `verify --witness`
then checks that the database still holds, for every chain a line names, that seq with that hash.

Writers: every replica appends to the same file. Each line is written with one write() on a
descriptor opened with O_APPEND (the kernel places each write at the end, whole), then fsync'd;
replicas' lines may interleave in any order and each stands alone. A line a chain's head
grew past is implied by the newer one: a chain whose record at the newest witnessed seq still has
the witnessed hash, and whose links all hold, cannot have had any earlier record changed. So the
reader keeps only the newest head of each chain, and files of any size are read in one pass.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.audit import chain as chains
from services.audit.signing import SigningKey, TrustedKeys

log = logging.getLogger(__name__)

WITNESS_VERSION = 1
LINE_FIELDS = frozenset({"v", "at", "db", "heads", "key_id", "signature"})
_HASH = re.compile(r"^[0-9a-f]{64}$")

# What the report says for each problem of the witness file itself.
PROBLEMS = {
    "witness_line_malformed": "the line is not a witness line (not JSON, or fields missing or of the wrong type)",
    "witness_signature_invalid": "the line's signature is not valid for a trusted key (forged or changed)",
    "witness_conflict": "two signed lines give different hashes for the same place of a chain",
}
WARNINGS = {
    "witness_line_incomplete": "the file's last line has no line end (a write cut short)",
}


def signed_text(line: Mapping) -> str:
    """What a witness line's signature covers: the line without its signature, canonical."""
    return chains.canonical({name: value for name, value in line.items() if name != "signature"})


def witness_line(key: SigningKey, db: str, heads: Mapping[str, tuple[int, str]], at: int) -> str:
    """One signed line (with its line end) saying that each chain of `db` had head (seq, hash) at `at`."""
    line: dict = {
        "v": WITNESS_VERSION,
        "at": at,
        "db": db,
        "heads": {chain: [int(seq), hash_] for chain, (seq, hash_) in sorted(heads.items())},
        "key_id": key.key_id,
    }
    line["signature"] = key.sign(signed_text(line))
    return chains.canonical(line) + "\n"


class Witness:
    """Appends signed head lines to the witness file (owner-only; its folder is created if missing)."""

    def __init__(self, path: Path, key: SigningKey, db: str):
        self.path = path
        self.key = key
        self.db = db

    def append(self, heads: Mapping[str, tuple[int, str]], at: int) -> bool:
        """Append one line; False (logged, never raised: the checkpoint pass goes on) when it fails."""
        data = witness_line(self.key, self.db, heads, at).encode("ascii")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                written = os.write(fd, data)  # one write: the line lands whole at the end
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("audit witness line not written", extra={"error_type": type(exc).__name__, "code": "witness"})
            return False
        if written != len(data):
            log.error("audit witness line cut short", extra={"code": "witness", "count": written})
            return False
        return True


@dataclass(frozen=True)
class LineProblem:
    source: str  # the file
    line: int  # 1-based
    problem: str

    @property
    def explanation(self) -> str:
        return {**PROBLEMS, **WARNINGS}[self.problem]

    def as_dict(self) -> dict:
        return {"file": self.source, "line": self.line, "problem": self.problem, "explanation": self.explanation}


@dataclass(frozen=True)
class Head:
    """The newest head of one chain the witness saw, and where."""

    seq: int
    hash: str
    at: int
    source: str
    line: int


@dataclass
class WitnessReading:
    """What the witness files say about one database: the newest head of each chain, the lines read,
    and what is wrong with the files themselves."""

    db: str
    files: list[str] = field(default_factory=list)
    lines: int = 0  # signed lines of this database
    other_lines: int = 0  # valid lines of another database (another deployment or test run)
    newest_at: int | None = None
    heads: dict[str, Head] = field(default_factory=dict)
    problems: list[LineProblem] = field(default_factory=list)
    warnings: list[LineProblem] = field(default_factory=list)

    def head(self, chain: str) -> tuple[int, str]:
        """The newest (seq, hash) of `chain` the witness saw; (0, GENESIS) for a chain it never named."""
        seen = self.heads.get(chain)
        return (seen.seq, seen.hash) if seen else (0, chains.GENESIS)

    def as_dict(self) -> dict:
        return {
            "files": self.files,
            "lines": self.lines,
            "other_database_lines": self.other_lines,
            "newest_at": self.newest_at,
            "chains": len(self.heads),
            "problems": [p.as_dict() for p in self.problems],
            "warnings": [w.as_dict() for w in self.warnings],
        }

    def read(self, path: Path, trusted: TrustedKeys) -> None:
        """Read one witness file into this reading (OSError when it cannot be opened)."""
        source = str(path)
        self.files.append(source)
        with path.open("rb") as lines:
            for number, raw in enumerate(lines, start=1):
                if not raw.endswith(b"\n"):
                    self.warnings.append(LineProblem(source, number, "witness_line_incomplete"))
                    continue
                problem = self._take(raw, trusted, source, number)
                if problem:
                    self.problems.append(LineProblem(source, number, problem))

    def _take(self, raw: bytes, trusted: TrustedKeys, source: str, number: int) -> str | None:
        line = parse_line(raw)
        if line is None:
            return "witness_line_malformed"
        if not trusted.verify(line["key_id"], signed_text(line), line["signature"]):
            return "witness_signature_invalid"
        if line["db"] != self.db:
            self.other_lines += 1
            return None
        self.lines += 1
        self.newest_at = max(self.newest_at or 0, line["at"])
        conflict = False
        for chain, (seq, hash_) in line["heads"].items():
            seen = self.heads.get(chain)
            if seen is not None and seen.seq == seq and seen.hash != hash_:
                conflict = True
            if seen is None or seq > seen.seq:
                self.heads[chain] = Head(seq, hash_, line["at"], source, number)
        return "witness_conflict" if conflict else None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_chain(value: object) -> bool:
    return isinstance(value, str) and (value == chains.SYSTEM_CHAIN or bool(chains.AGENCY_ID.fullmatch(value)))


def _is_head(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and _is_int(value[0])
        and value[0] >= 1
        and isinstance(value[1], str)
        and bool(_HASH.fullmatch(value[1]))
    )


def parse_line(raw: bytes) -> dict | None:
    """The fields of one witness line when it has exactly the witness form, else None."""
    try:
        line = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(line, dict) or set(line) != LINE_FIELDS:
        return None
    if not _is_int(line["v"]) or line["v"] != WITNESS_VERSION:
        return None
    heads = line["heads"]
    if not (
        _is_int(line["at"])
        and isinstance(line["db"], str)
        and isinstance(line["key_id"], str)
        and isinstance(line["signature"], str)
        and isinstance(heads, dict)
        and all(_is_chain(chain) and _is_head(head) for chain, head in heads.items())
    ):
        return None
    return line


def read_witness(paths: Iterable[Path], trusted: TrustedKeys, db: str) -> WitnessReading:
    """Every line of the witness files `paths` about database `db` (OSError for a file that cannot be read)."""
    reading = WitnessReading(db)
    for path in paths:
        reading.read(path, trusted)
    return reading
