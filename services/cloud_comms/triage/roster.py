"""The agency's patient roster (name, date of birth, MRN), owned by cloud-comms for triage.

Each patient is one `patients` document, its name, birth date and MRN sealed with the agency's
key (kit PhiCipher, record = the patient id, field "patient"). Look-ups never decrypt the roster:
they go through **blind indexes**, keyed hashes of the normalised values (HMAC-SHA256 with a key
derived per agency from CLOUD_TRIAGE_INDEX_KEY), stored beside the sealed record:

- `mrn_key` (unique per agency: the roster is keyed by MRN, an import upserts by it), `dob_key`,
  `family_keys` and `given_keys` (match.py's forms) on the patient document;
- `patient_name_keys`: one document per (patient, prefix of a name word, 2+ letters; the words of
  the given names, of the family name and the family name's words together: "O'Connor" is found
  by "o'con" and "oconnor"), for staff searching by part of a name.

Arrays are stored, not queried: nx-27017 does not match array elements through an index, so every
query here is `$eq` on a scalar field.

The patient id is derived from (agency, MRN key), so importing the same MRN again updates one
patient. Only the few patients a look-up returns are decrypted, to show them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace

from pymongo.database import Database
from pymongo.errors import BulkWriteError

from services.cloud_comms.triage import match
from services.cloud_comms.triage.extract import Extracted, PatientFields, suffix_of, swapped
from services.kit.crypto import DecryptionError, PhiCipher
from services.kit.mongo import IndexSpec, ensure_indexes, now_ms

PATIENTS = "patients"
NAME_KEYS = "patient_name_keys"
INDEXES = [
    IndexSpec(PATIENTS, [("agency_id", 1), ("mrn_key", 1)], unique=True, name="patients_by_mrn"),
    IndexSpec(PATIENTS, [("agency_id", 1), ("dob_key", 1)], name="patients_by_birth_date"),
    IndexSpec(NAME_KEYS, [("agency_id", 1), ("k", 1)], name="patient_name_keys_by_key"),
]
CANDIDATES_PER_KEY = 50
SEARCH_PER_KEY = 500
MIN_PREFIX = 2

# The demo roster of development (CLINIC_MODE=development): the same values every helper and test
# uses. Agency ids are directory's demo agencies (services/directory/demo.py).
DEMO_ROSTER = {
    "agy_riverbend": (
        {"mrn": "RB100234", "family": "Lopez", "given": "Maria", "birth_date": "1984-03-12"},
        {"mrn": "RB100871", "family": "Carter", "given": "James", "birth_date": "1975-11-02"},
        {"mrn": "RB101552", "family": "Lopez", "given": "Ana", "birth_date": "1990-07-19"},
        {"mrn": "RB100001", "family": "Demo-Client", "given": "Jane", "birth_date": "1988-05-05"},
    ),
    "agy_lakeside": ({"mrn": "LK200001", "family": "Demo-Patient", "given": "Lee", "birth_date": "1979-09-09"},),
}


def valid_birth_date(value: str) -> bool:
    """An ISO date (YYYY-MM-DD) from 1900 to today."""
    try:
        date = dt.date.fromisoformat(value)
    except ValueError:
        return False
    return len(value) == 10 and dt.date(1900, 1, 1) <= date <= dt.date.today()


def fields_of(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "_id"}


class BlindIndex:
    """Keyed hashes of normalised values, one derived key per agency: equal values of one agency
    have equal keys; nothing links them to the values (or to another agency's) without the secret."""

    def __init__(self, secret: str):
        self._secret = secret.encode()
        self._keys: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def _agency_key(self, agency_id: str) -> bytes:
        with self._lock:
            key = self._keys.get(agency_id)
            if key is None:
                key = hmac.new(self._secret, f"triage-agency\x1f{agency_id}".encode(), hashlib.sha256).digest()
                self._keys[agency_id] = key
            return key

    def key(self, agency_id: str, kind: str, value: str) -> str:
        return hmac.new(self._agency_key(agency_id), f"{kind}\x1f{value}".encode(), hashlib.sha256).hexdigest()[:40]


@dataclass(frozen=True)
class Patient:
    id: str
    mrn: str
    family: str
    given: str
    birth_date: str

    @property
    def name(self) -> str:
        return f"{self.given} {self.family}".strip()

    def view(self) -> dict:
        return {"id": self.id, "name": self.name, "birth_date": self.birth_date, "mrn": self.mrn}


class Roster:
    def __init__(self, db: Database, cipher: PhiCipher, index: BlindIndex):
        self.patients = db[PATIENTS]
        self.name_keys = db[NAME_KEYS]
        self.cipher = cipher
        self.index = index

    def ensure_indexes(self) -> None:
        ensure_indexes(self.patients.database, INDEXES)

    # --- keys -------------------------------------------------------------------------------------
    def _keys(self, agency_id: str, kind: str, values: Iterable[str]) -> list[str]:
        return [self.index.key(agency_id, kind, v) for v in values if v]

    def _mrn_key(self, agency_id: str, mrn: str) -> str:
        normal = match.normalize_mrn(mrn)
        return self.index.key(agency_id, "mrn", normal) if normal else ""

    def _name_prefix_keys(self, agency_id: str, family: str, given: str) -> list[str]:
        tokens = dict.fromkeys([*match.name_tokens(given), *match.family_forms(family)])
        prefixes = {t[:n] for t in tokens for n in range(MIN_PREFIX, len(t) + 1)}
        return sorted(self._keys(agency_id, "name", prefixes))

    def patient_id(self, agency_id: str, mrn_key: str) -> str:
        return "pt_" + hashlib.sha256(f"{agency_id}\x1f{mrn_key}".encode()).hexdigest()[:24]

    # --- import -----------------------------------------------------------------------------------
    def upsert(self, agency_id: str, records: Iterable[dict]) -> dict[str, int]:
        """Add or update patients by MRN (`records`: mrn, family, given, birth_date, already valid);
        counts of created, updated and unchanged."""
        counts = {"created": 0, "updated": 0, "unchanged": 0}
        for record in records:
            counts[self._upsert_one(agency_id, record)] += 1
        return counts

    def _upsert_one(self, agency_id: str, record: dict) -> str:
        mrn_key = self._mrn_key(agency_id, record["mrn"])
        pid = self.patient_id(agency_id, mrn_key)
        fields = {k: record[k] for k in ("mrn", "family", "given", "birth_date")}
        (family, family_suffix), (given, given_suffix) = suffix_of(fields["family"]), suffix_of(fields["given"])
        suffix = family_suffix or given_suffix
        doc = {
            "_id": pid,
            "agency_id": agency_id,
            "mrn_key": mrn_key,
            "dob_key": self.index.key(agency_id, "dob", fields["birth_date"]),
            "family_keys": self._keys(agency_id, "family", match.family_forms(family)),
            "given_keys": self._keys(agency_id, "given", match.name_tokens(given)),
            "suffix_key": self.index.key(agency_id, "suffix", suffix) if suffix else "",
            "name_keys": self._name_prefix_keys(agency_id, fields["family"], fields["given"]),
        }
        existing = self.patients.find_one({"_id": {"$eq": pid}})
        if existing is not None and self._same(existing, doc, fields):
            return "unchanged"
        self._index_name(agency_id, pid, doc["name_keys"], (existing or {}).get("name_keys", []))
        sealed = self.cipher.seal(agency_id, pid, "patient", json.dumps(fields))
        now = now_ms()
        # $set rather than a replacement: nx-27017 0.8.1 cannot replace a document holding bytes.
        self.patients.update_one(
            {"_id": {"$eq": pid}},
            {"$set": {**fields_of(doc), "sealed": sealed, "updated_at": now}, "$setOnInsert": {"created_at": now}},
            upsert=True,
        )
        return "updated" if existing else "created"

    def _same(self, existing: dict, doc: dict, fields: dict) -> bool:
        if any(existing.get(k) != v for k, v in doc.items()):
            return False
        try:
            return json.loads(self.cipher.open(doc["agency_id"], doc["_id"], "patient", existing["sealed"])) == fields
        except (DecryptionError, KeyError, ValueError):
            return False

    def _index_name(self, agency_id: str, pid: str, keys: list[str], old: list[str]) -> None:
        """The name prefix keys of one patient: new ones first, then the ones no longer true."""
        fresh = [{"_id": f"{pid}:{k}", "agency_id": agency_id, "k": k, "patient_id": pid} for k in keys]
        if fresh:
            try:
                self.name_keys.insert_many(fresh, ordered=False)
            except BulkWriteError as exc:
                if any(error.get("code") != 11000 for error in exc.details.get("writeErrors", [])):
                    raise
        for stale in set(old) - set(keys):
            self.name_keys.delete_one({"_id": {"$eq": f"{pid}:{stale}"}})

    # --- reading ----------------------------------------------------------------------------------
    def _open(self, doc: dict) -> Patient | None:
        try:
            fields = json.loads(self.cipher.open(doc["agency_id"], doc["_id"], "patient", doc["sealed"]))
        except (DecryptionError, KeyError, ValueError):
            return None
        return Patient(doc["_id"], fields["mrn"], fields["family"], fields["given"], fields["birth_date"])

    def _doc(self, agency_id: str, pid: str) -> dict | None:
        return self.patients.find_one({"_id": {"$eq": pid}, "agency_id": {"$eq": agency_id}})

    def get(self, agency_id: str, patient_ids: Iterable[str]) -> dict[str, Patient]:
        """The agency's patients among `patient_ids` (decrypted), by id; unknown ones left out."""
        found = {}
        for pid in dict.fromkeys(patient_ids):
            doc = self._doc(agency_id, pid)
            patient = self._open(doc) if doc is not None else None
            if patient is not None:
                found[pid] = patient
        return found

    def exists(self, agency_id: str, patient_id: str) -> bool:
        return (
            self.patients.find_one({"_id": {"$eq": patient_id}, "agency_id": {"$eq": agency_id}}, projection={"_id": 1})
            is not None
        )

    def _ids_with_name_key(self, agency_id: str, key: str, limit: int) -> set[str]:
        found = self.name_keys.find({"agency_id": {"$eq": agency_id}, "k": {"$eq": key}}, projection={"patient_id": 1})
        return {d["patient_id"] for d in found.limit(limit)}

    def search(self, agency_id: str, q: str, limit: int = 20) -> list[Patient]:
        """Patients whose MRN is `q`, or whose name words start with every word of `q`."""
        ids: set[str] = set()
        mrn_key = self._mrn_key(agency_id, q) if any(c.isdigit() for c in q) else ""
        if mrn_key:
            ids |= {
                d["_id"] for d in self.patients.find({"agency_id": {"$eq": agency_id}, "mrn_key": {"$eq": mrn_key}})
            }
        words = sorted({t for t in match.name_tokens(q) if len(t) >= MIN_PREFIX}, key=len, reverse=True)
        if words:
            named = self._ids_with_name_key(agency_id, self.index.key(agency_id, "name", words[0]), SEARCH_PER_KEY)
            for word in words[1:]:
                if not named:
                    break
                named &= self._ids_with_name_key(agency_id, self.index.key(agency_id, "name", word), SEARCH_PER_KEY)
            ids |= named
        patients = self.get(agency_id, sorted(ids)[: limit * 5])
        return sorted(patients.values(), key=lambda p: (p.family.lower(), p.given.lower(), p.mrn))[:limit]

    # --- matching ---------------------------------------------------------------------------------
    def _probe(self, agency_id: str, fields: PatientFields, strong: list[str], weak: list[str]) -> match.Probe:
        given = match.name_tokens(fields.given[0]) if fields.given else []
        return match.Probe(
            mrns=frozenset(k for k in (self._mrn_key(agency_id, m) for m in strong) if k),
            birth_date=self.index.key(agency_id, "dob", fields.birth_date) if fields.birth_date else "",
            family=frozenset(self._keys(agency_id, "family", match.family_forms(fields.family))),
            given=self.index.key(agency_id, "given", given[0]) if given else "",
            suffix=self.index.key(agency_id, "suffix", fields.suffix) if fields.suffix else "",
            weak_mrns=frozenset(k for k in (self._mrn_key(agency_id, m) for m in weak) if k),
        )

    def probe(self, agency_id: str, found: Extracted, authorities: Iterable[str] = ()) -> match.Probe:
        """The document's patient as blind keys. Its MRNs are every labelled MRN of every mention
        and the C-CDA ids of the agency's `authorities` (they can conflict); with no authorities
        named, every C-CDA id is a weak MRN (matches, never conflicts); with some, other ids are
        ignored."""
        authorities = frozenset(authorities)
        everyone = (found.patient, *found.patients)
        strong = [m for p in everyone for m in p.mrns]
        strong += [ext for p in everyone for root, ext in p.ids if root in authorities]
        weak = [] if authorities else [ext for p in everyone for _, ext in p.ids]
        probe = self._probe(agency_id, found.patient, strong, weak)
        if found.patient.order_unsure:
            other = self._probe(agency_id, swapped(found.patient), strong, weak)
            probe = replace(probe, swapped=other)
        return probe

    def candidates(self, agency_id: str, found: Extracted, authorities: Iterable[str] = ()) -> list[match.Match]:
        """The likeliest patients for what a document says (match.rank), found by blind index only."""
        fields = found.patient
        if not fields and not found.patients:
            return []
        probe = self.probe(agency_id, found, authorities)
        agency = {"agency_id": {"$eq": agency_id}}
        docs: dict[str, dict] = {}
        for key in probe.mrns | probe.weak_mrns:
            docs.update((d["_id"], d) for d in self.patients.find({**agency, "mrn_key": {"$eq": key}}))
        if probe.birth_date:
            found_dob = self.patients.find({**agency, "dob_key": {"$eq": probe.birth_date}}).limit(CANDIDATES_PER_KEY)
            docs.update((d["_id"], d) for d in found_dob)
        words = [fields.family, *(fields.given[:1] if fields.order_unsure else ())]
        for word in (t for t in dict.fromkeys(match.name_tokens(" ".join(words))) if len(t) >= MIN_PREFIX):
            for pid in self._ids_with_name_key(agency_id, self.index.key(agency_id, "name", word), CANDIDATES_PER_KEY):
                if pid not in docs and (doc := self._doc(agency_id, pid)) is not None:
                    docs[pid] = doc
        return match.rank(probe, (self._candidate(d) for d in docs.values()))

    @staticmethod
    def _candidate(doc: dict) -> match.Candidate:
        return match.Candidate(
            patient_id=doc["_id"],
            mrn=doc["mrn_key"],
            birth_date=doc["dob_key"],
            family=frozenset(doc.get("family_keys", [])),
            given=frozenset(doc.get("given_keys", [])),
            suffix=doc.get("suffix_key", ""),
        )

    def seed_demo(self) -> dict[str, int]:
        """Upsert the demo roster (development); unchanged patients are not rewritten."""
        totals = {"created": 0, "updated": 0, "unchanged": 0}
        for agency_id, records in DEMO_ROSTER.items():
            for name, count in self.upsert(agency_id, records).items():
                totals[name] += count
        return totals
