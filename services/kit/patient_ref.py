"""Patient references: how an audit record names a patient known only by an identifier that is PHI.

A lab result names its patient by medical record number (HL7 v2 PID-3, FHIR Patient.identifier),
an ePrescribing item by the vendor's patient id. An MRN is one of HIPAA's identifiers, and the
audit trail holds ids, never PHI: it is stored in clear (the audit service holds no PHI key) and
its events cross the bus unsealed. So such a patient is named by a pseudonym instead:

    pref_<32 hex> = HMAC-SHA256(PATIENT_REF_KEY, agency, system, normalised identifier)[:128 bits]

- Stable: the same patient is the same reference in every record, so "who looked at this client"
  is one equality query on `patient_id`.
- Computable by the audit service, which holds this key and no PHI key: a compliance officer
  searching by MRN gives the identifier and its system, and the audit service computes the same
  reference (`search_refs`, with earlier keys too). It is therefore not derived from the PHI
  master key.
- Not reversible without the key, and keyed per agency and identifier space (`system`): the same
  number in two agencies, or an MRN and a vendor id that happen to be equal, are different refs.

`system` names the identifier space: `mrn_system(authority, id_type)` for record numbers
("mrn:<assigning authority or facility>"), `erx_system(vendor)` for vendor patient ids
("erx:<vendor>"). Which one each service passes: docs/audit-coverage.md, "Patient references".
Directory ids (`pat_...`) are internal ids already and are never passed through here.

PATIENT_REF_KEY (or _FILE): at least 32 characters; development generates one into the run
folder, so every service of a stack shares it; production refuses to start without it in the
services that use it. Replacing it changes every reference made afterwards: keep the replaced
ones in PATIENT_REF_PREVIOUS_KEYS (comma-separated) where records are searched (the audit service).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import unicodedata
from dataclasses import dataclass, field

from services.kit.settings import Env

PREFIX = "pref_"
KEY_ENV = "PATIENT_REF_KEY"
PREVIOUS_KEYS_ENV = "PATIENT_REF_PREVIOUS_KEYS"
DEV_KEY_FILE = "patient-ref-key"
MIN_KEY_CHARS = 32
# Binds the digest to this use and version: the same key used elsewhere gives unrelated values.
DOMAIN = b"clinic.patient_ref.v1"
HEX_CHARS = 32
REF_PATTERN = re.compile(rf"^{PREFIX}[0-9a-f]{{{HEX_CHARS}}}$")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class PatientRefKeys:
    """The key new references are made with, and the replaced ones a search still tries."""

    current: str = field(default="", repr=False)
    previous: tuple[str, ...] = field(default=(), repr=False)

    @property
    def all(self) -> tuple[str, ...]:
        return tuple(key for key in (self.current, *self.previous) if key)


def new_key() -> str:
    return secrets.token_hex(32)


def read_keys(env: Env) -> PatientRefKeys:
    """PATIENT_REF_KEY (or _FILE; development: generated into the run folder, shared by the stack)
    and PATIENT_REF_PREVIOUS_KEYS (or _FILE); problems are recorded in `env`."""
    current = env.secret(KEY_ENV, DEV_KEY_FILE, new_key)
    previous_raw = env.given_secret(PREVIOUS_KEYS_ENV) or ""
    previous = tuple(key.strip() for key in previous_raw.split(",") if key.strip())
    if current and len(current) < MIN_KEY_CHARS:
        env.problems.append(f"{KEY_ENV} must be at least {MIN_KEY_CHARS} characters")
    if any(len(key) < MIN_KEY_CHARS for key in previous):
        env.problems.append(f"each key of {PREVIOUS_KEYS_ENV} must be at least {MIN_KEY_CHARS} characters")
    return PatientRefKeys(current, previous)


def _normal(text: str) -> str:
    """Compatibility-normalised, trimmed, inner whitespace runs as one space, case-folded: how a
    sender, a vendor and an officer typing it may differ for the same identifier."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()


def normalise_identifier(identifier: str | None) -> str:
    return _normal(str(identifier or ""))


def normalise_system(system: str) -> str:
    """'<space>[:<qualifier>]' with no space around the colon, e.g. 'mrn:riverbend', 'erx:dosespot'."""
    kind, colon, qualifier = _normal(system).partition(":")
    return f"{kind.strip()}{colon}{qualifier.strip()}"


def mrn_system(authority: str = "", id_type: str = "MR") -> str:
    """A patient identifier space: 'mrn:<authority>' for medical record numbers (HL7 type MR),
    '<type>:<authority>' for another HL7 identifier type (CX-5), 'mrn' when no authority is known."""
    kind = "mrn" if _normal(id_type) in ("", "mr", "mrn") else _normal(id_type)
    return normalise_system(f"{kind}:{authority}" if _normal(authority) else kind)


def erx_system(vendor: str) -> str:
    """An ePrescribing vendor's patient ids: 'erx:<vendor>' (e.g. 'erx:dosespot')."""
    return normalise_system(f"erx:{vendor}")


def _field(text: str) -> bytes:
    data = text.encode("utf-8")
    return len(data).to_bytes(4, "big") + data


def patient_ref(agency_id: str, system: str, identifier: str | None, *, key: str) -> str:
    """The reference of the patient `identifier` names in `system` for `agency_id`; "" when the
    identifier is empty (no patient is known). ValueError without a key, agency or system."""
    identifier = normalise_identifier(identifier)
    if not identifier:
        return ""
    agency_id, system = str(agency_id or "").strip(), normalise_system(system or "")
    if not key or not agency_id or not system:
        raise ValueError("a patient reference needs a key, an agency and a system")
    message = DOMAIN + _field(agency_id) + _field(system) + _field(identifier)
    digest = hmac.new(key.encode("utf-8"), message, hashlib.sha256).hexdigest()
    return PREFIX + digest[:HEX_CHARS]


def search_refs(agency_id: str, system: str, identifier: str | None, keys: PatientRefKeys) -> list[str]:
    """Every reference the patient may have been recorded under (the current key, then replaced
    ones), without duplicates; [] for an empty identifier."""
    refs = [patient_ref(agency_id, system, identifier, key=key) for key in keys.all]
    return [ref for ref in dict.fromkeys(refs) if ref]


def is_patient_ref(value: str) -> bool:
    return bool(REF_PATTERN.fullmatch(value or ""))
