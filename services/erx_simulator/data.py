"""The simulator's state: one DoseSpot-shaped clinic, its clinicians and the items they must act on,
the tokens it issued, the calls it answered and the faults waiting to be injected.

Everything here is fictional development data (no real patient, clinician or clinic). One lock
guards it all; the HTTP layer (app.py) reads and changes it only through `Store`'s methods.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import itertools
import math
import secrets
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable

# The kinds, spelled as the bridge spells them (services/erx_bridge/vendors/base.py).
REFILL = "refill_request"
PENDING = "pending_prescription"
ERROR = "transaction_error"
KINDS = (REFILL, PENDING, ERROR)
ID_PREFIX = {REFILL: "refill", ERROR: "error", PENDING: "pending"}

# Endpoint names: call counters and fault targets.
ENDPOINTS = ("token", "counts", "refills", "errors", "pending", "patient", "prescription", "sso")
AUTHENTICATED = frozenset(ENDPOINTS) - {"token", "sso"}

FAULT_KINDS = ("slow", "timeout", "status", "rate_limit", "expired_token", "malformed")
MALFORMED_SHAPES = ("invalid_json", "wrong_shape", "html")

DEV_CLINIC_ID = "1001"
DEV_CLINIC_KEY = "dev-clinic-key-not-secret"  # development only; not a secret  # noqa: S105
DEMO_CLINICIANS = ("2001", "2002", "2003")
SSO_PHRASE_LENGTH = 32
SSO_USER_PHRASE_LENGTH = 22

FIRST_NAMES = ("Avery", "Briar", "Cass", "Dell", "Emery", "Fennel", "Gale", "Harlow", "Indigo", "Juniper", "Kestrel")
LAST_NAMES = ("Quillfeather", "Marrowby", "Tennick", "Ashgrove", "Pellow", "Underhay", "Wrenfield", "Oakhurst")
MEDICATIONS = (
    "Sertraline 50 mg tablet",
    "Lisinopril 10 mg tablet",
    "Metformin 500 mg tablet",
    "Bupropion XL 150 mg tablet",
    "Atorvastatin 20 mg tablet",
    "Buspirone 10 mg tablet",
    "Levothyroxine 50 mcg tablet",
    "Amlodipine 5 mg tablet",
    "Escitalopram 10 mg tablet",
    "Hydroxyzine 25 mg capsule",
)
ERROR_DETAILS = (
    "Pharmacy rejected the message: NCPDP ID not found",
    "No response from the pharmacy before the transmission timed out",
    "Pharmacy rejected the message: patient date of birth missing",
    "Pharmacy does not accept electronic prescriptions",
)
PENDING_STATUSES = ("Entered", "Edited", "ReadyToSign")


def dotnet_time(when: dt.datetime) -> str:
    """ISO 8601 with seven fractional digits and an offset, as .NET writes a DateTimeOffset."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0+00:00"


def js_time(when: dt.datetime) -> str:
    """ISO 8601 with milliseconds and Z (the guide's samples write errors this way)."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _sha512_base64(text: str) -> str:
    encoded = base64.b64encode(hashlib.sha512(text.encode("utf-8")).digest()).decode("ascii")
    return encoded[:-2] if encoded.endswith("==") else encoded


def _number(value: str) -> int | str:
    return int(value) if value.isdigit() else value


@dataclasses.dataclass
class Patient:
    patient_id: int
    clinic_id: str
    first_name: str
    last_name: str
    date_of_birth: str

    def as_json(self) -> dict:
        return {
            "PatientId": self.patient_id,
            "Prefix": None,
            "FirstName": self.first_name,
            "MiddleName": None,
            "LastName": self.last_name,
            "Suffix": None,
            "DateOfBirth": self.date_of_birth,
            "Gender": "Unknown",
            "Active": True,
        }


@dataclasses.dataclass
class Prescription:
    prescription_id: int
    patient_id: int
    clinic_id: str
    clinician_id: str
    display_name: str
    written: dt.datetime
    status: str
    pharmacy_id: int

    def as_json(self) -> dict:
        return {
            "PrescriptionId": self.prescription_id,
            "WrittenDate": dotnet_time(self.written),
            "Directions": "Take as directed",
            "Quantity": "30",
            "DaysSupply": 30,
            "Refills": "1",
            "PharmacyId": self.pharmacy_id,
            "PrescriberId": _number(self.clinician_id),
            "Status": self.status,
            "ClinicId": _number(self.clinic_id),
            "DisplayName": self.display_name,
        }


@dataclasses.dataclass
class Item:
    """One open item: a refill request (id = RefillId), a transmission error or a pending
    prescription (id = PrescriptionId)."""

    kind: str
    item_id: int
    clinician_id: str
    clinic_id: str
    patient_id: int
    prescription_id: int
    at: dt.datetime
    detail: str = ""
    new_patient: bool = False

    @property
    def vendor_item_id(self) -> str:
        return f"{ID_PREFIX[self.kind]}:{self.item_id}"


@dataclasses.dataclass
class Fault:
    kind: str
    times: int
    endpoint: str | None = None
    clinician: str | None = None
    delay_s: float = 0.0
    status: int = 500
    retry_after: str | None = None  # the Retry-After header as sent (seconds or an HTTP date)
    retry_after_date_in_s: float | None = None  # or: an HTTP date this far ahead of the answer
    shape: str = "invalid_json"

    def matches(self, endpoint: str, clinician: str | None) -> bool:
        if self.endpoint is not None and self.endpoint != endpoint:
            return False
        if self.clinician is not None and self.clinician != clinician:
            return False
        # An expired token needs a token: the token and sso endpoints never take that fault.
        return not (self.kind == "expired_token" and endpoint not in AUTHENTICATED)

    def as_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class Store:
    def __init__(
        self,
        *,
        clinic_key: str = DEV_CLINIC_KEY,
        token_ttl_s: float = 3600.0,
        page_size: int = 20,
        subscription_key: str = "",
        clock: Callable[[], float] = time.time,
    ):
        self.clinic_key = clinic_key
        self.token_ttl_s = token_ttl_s
        self.page_size = page_size
        self.subscription_key = subscription_key
        self.clock = clock
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self.reset(demo=True)

    # -- whole state ----------------------------------------------------------------------------

    def reset(self, *, demo: bool = True) -> None:
        """Back to the start: demo data (or none), no tokens, no faults, no calls counted. Wakes
        every request a slow or timeout fault holds."""
        with self._lock:
            self.clinics: dict[str, str] = {DEV_CLINIC_ID: self.clinic_key}
            self.clinicians: dict[str, str] = {}  # clinician id -> clinic id
            self.patients: dict[int, Patient] = {}
            self.prescriptions: dict[int, Prescription] = {}
            self.items: dict[str, dict[str, OrderedDict[int, Item]]] = {}
            self.tokens: dict[str, tuple[str, str, float]] = {}  # token -> (clinic, clinician, expires at)
            self.calls: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
            self.faults: list[Fault] = []
            self.used_sso_codes: OrderedDict[str, None] = OrderedDict()
            self._ids = {
                "patient": itertools.count(50001),
                "prescription": itertools.count(700001),
                "refill": itertools.count(90001),
                "pharmacy": itertools.count(1),
            }
            self._wake.set()
            self._wake = threading.Event()
            if demo:
                self._load_demo()

    def _load_demo(self) -> None:
        # clinician -> (refill requests, pending prescriptions, transmission errors)
        plan = {"2001": (3, 2, 1), "2002": (2, 3, 2), "2003": (1, 1, 1)}
        for number, (clinician, per_kind) in enumerate(plan.items()):
            self.add_clinician(clinician)
            for kind, count in zip((REFILL, PENDING, ERROR), per_kind, strict=True):
                for i in range(count):
                    self.add_item(clinician, kind, seed=number * 7 + i * 3 + KINDS.index(kind))

    def wake_all(self) -> None:
        with self._lock:
            self._wake.set()
            self._wake = threading.Event()

    def sleep(self, seconds: float) -> None:
        """Hold a request for `seconds`, or until reset()/wake_all()."""
        with self._lock:
            wake = self._wake
        wake.wait(max(0.0, seconds))

    # -- clinicians and items -------------------------------------------------------------------

    def add_clinician(self, clinician_id: str, clinic_id: str = DEV_CLINIC_ID) -> None:
        with self._lock:
            if clinic_id not in self.clinics:
                raise ValueError(f"unknown clinic {clinic_id!r}")
            self.clinicians.setdefault(clinician_id, clinic_id)
            self.items.setdefault(clinician_id, {kind: OrderedDict() for kind in KINDS})

    def add_item(
        self,
        clinician_id: str,
        kind: str,
        *,
        seed: int = 0,
        patient_name: str | None = None,
        medication: str | None = None,
        detail: str | None = None,
        new_patient: bool = False,
    ) -> Item:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        with self._lock:
            if clinician_id not in self.clinicians:
                self.add_clinician(clinician_id)
            clinic_id = self.clinicians[clinician_id]
            now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
            at = now - dt.timedelta(hours=1 + seed % 47, minutes=(seed * 13) % 60)
            first, last = FIRST_NAMES[seed % len(FIRST_NAMES)], LAST_NAMES[(seed // 2) % len(LAST_NAMES)]
            if patient_name:
                first, _, last = patient_name.partition(" ")
            birth = f"19{50 + seed % 50:02d}-0{1 + seed % 9}-1{seed % 10}"
            patient = Patient(next(self._ids["patient"]), clinic_id, first, last, birth)
            self.patients[patient.patient_id] = patient
            status = {
                REFILL: "Requested",
                ERROR: "Error",
                PENDING: PENDING_STATUSES[(seed // 3) % len(PENDING_STATUSES)],
            }
            rx = Prescription(
                prescription_id=next(self._ids["prescription"]),
                patient_id=patient.patient_id,
                clinic_id=clinic_id,
                clinician_id=clinician_id,
                display_name=medication or MEDICATIONS[seed % len(MEDICATIONS)],
                written=at - dt.timedelta(days=1),
                status=status[kind],
                pharmacy_id=1 + seed % 5,
            )
            self.prescriptions[rx.prescription_id] = rx
            item_id = next(self._ids["refill"]) if kind == REFILL else rx.prescription_id
            item = Item(
                kind=kind,
                item_id=item_id,
                clinician_id=clinician_id,
                clinic_id=clinic_id,
                patient_id=patient.patient_id,
                prescription_id=rx.prescription_id,
                at=at,
                detail=detail
                if detail is not None
                else (ERROR_DETAILS[seed % len(ERROR_DETAILS)] if kind == ERROR else ""),
                new_patient=new_patient,
            )
            self.items[clinician_id][kind][item_id] = item
            return item

    @staticmethod
    def _default_detail(kind: str, seed: int) -> str:
        return ERROR_DETAILS[seed % len(ERROR_DETAILS)] if kind == ERROR else ""

    def resolve(self, vendor_item_id: str) -> bool:
        prefix, _, raw_id = vendor_item_id.partition(":")
        kind = {v: k for k, v in ID_PREFIX.items()}.get(prefix)
        if kind is None or not raw_id.isdigit():
            return False
        with self._lock:
            for per_kind in self.items.values():
                if per_kind[kind].pop(int(raw_id), None) is not None:
                    return True
        return False

    def bulk_load(self, clinicians: int, items: int, *, first_clinician_id: int = 3001) -> list[str]:
        """`clinicians` new prescribers with `items` open items each, spread over the three kinds."""
        ids = [str(first_clinician_id + n) for n in range(clinicians)]
        with self._lock:
            for n, clinician in enumerate(ids):
                self.add_clinician(clinician)
                for i in range(items):
                    self.add_item(clinician, KINDS[i % len(KINDS)], seed=n * 31 + i)
        return ids

    def counts(self, clinician_id: str) -> dict[str, int]:
        with self._lock:
            per_kind = self.items.get(clinician_id) or {kind: {} for kind in KINDS}
            return {kind: len(per_kind[kind]) for kind in KINDS}

    def page(self, clinician_id: str, kind: str, page: int) -> tuple[list[tuple[Item, Patient, Prescription]], dict]:
        """One page of a clinician's open items of `kind` (each with its patient and prescription)
        and DoseSpot's PageResult for it."""
        with self._lock:
            everything = list((self.items.get(clinician_id) or {}).get(kind, {}).values())
            chosen = [
                (item, self.patients[item.patient_id], self.prescriptions[item.prescription_id])
                for item in everything[(page - 1) * self.page_size : page * self.page_size]
            ]
        total_pages = math.ceil(len(everything) / self.page_size) if everything else 0
        paging = {
            "CurrentPage": page,
            "TotalPages": total_pages,
            "PageSize": self.page_size,
            "TotalCount": len(everything),
            "HasPrevious": page > 1,
            "HasNext": page < total_pages,
        }
        return chosen, paging

    def patient_for(self, clinic_id: str, patient_id: int) -> Patient | None:
        with self._lock:
            patient = self.patients.get(patient_id)
            return patient if patient is not None and patient.clinic_id == clinic_id else None

    def prescription_for(self, clinic_id: str, patient_id: int, prescription_id: int) -> Prescription | None:
        with self._lock:
            rx = self.prescriptions.get(prescription_id)
            if rx is None or rx.patient_id != patient_id or rx.clinic_id != clinic_id:
                return None
            return rx

    def summary(self) -> dict:
        with self._lock:
            return {
                "clinics": sorted(self.clinics),
                "clinicians": {
                    clinician: {"clinic_id": clinic, **self.counts(clinician)}
                    for clinician, clinic in sorted(self.clinicians.items())
                },
                "tokens": len(self.tokens),
                "faults": [fault.as_json() for fault in self.faults],
            }

    # -- tokens ---------------------------------------------------------------------------------

    def issue_token(self, form: dict[str, str]) -> tuple[int, dict]:
        """The password grant of DoseSpot's connect/token; (status, OAuth 2.0 answer)."""
        if form.get("grant_type") != "password":
            return 400, {"error": "unsupported_grant_type"}
        clinic_id = form.get("client_id", "")
        with self._lock:
            key = self.clinics.get(clinic_id)
            if key is None or not hmac.compare_digest(form.get("client_secret", ""), key):
                return 400, {"error": "invalid_client"}
            username = form.get("username", "")
            if not hmac.compare_digest(form.get("password", ""), key) or self.clinicians.get(username) != clinic_id:
                return 400, {"error": "invalid_grant"}
            scope = form.get("scope")
            if scope not in (None, "", "api"):
                return 400, {"error": "invalid_scope"}
            now = self.clock()
            for stale in [t for t, (_, _, expires) in self.tokens.items() if expires <= now]:
                del self.tokens[stale]
            token = secrets.token_urlsafe(32)
            self.tokens[token] = (clinic_id, username, now + self.token_ttl_s)
        return 200, {
            "access_token": token,
            "expires_in": int(self.token_ttl_s),
            "token_type": "Bearer",
            "scope": "api",
        }

    def token_owner(self, token: str) -> tuple[str, str] | None:
        """(clinic id, clinician id) of a valid token, or None."""
        with self._lock:
            found = self.tokens.get(token)
            if found is None or found[2] <= self.clock():
                return None
            return found[0], found[1]

    def expire_token(self, token: str) -> None:
        with self._lock:
            if token in self.tokens:
                clinic, clinician, _ = self.tokens[token]
                self.tokens[token] = (clinic, clinician, self.clock() - 1)

    def subscription_key_ok(self, given: str | None) -> bool:
        return not self.subscription_key or (given is not None and hmac.compare_digest(given, self.subscription_key))

    # -- calls and faults -----------------------------------------------------------------------

    def count_call(self, endpoint: str, clinician: str | None) -> None:
        with self._lock:
            self.calls[endpoint][clinician or "-"] += 1

    def call_counts(self) -> dict:
        with self._lock:
            calls = {endpoint: dict(per) for endpoint, per in self.calls.items() if per}
        return {"calls": calls, "total": sum(sum(per.values()) for per in calls.values())}

    def clear_calls(self) -> None:
        with self._lock:
            self.calls.clear()

    def add_fault(self, fault: Fault) -> Fault:
        if fault.kind not in FAULT_KINDS:
            raise ValueError(f"fault must be one of {', '.join(FAULT_KINDS)}")
        if fault.endpoint is not None and fault.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
        if fault.times < 1:
            raise ValueError("times must be at least 1")
        if fault.shape not in MALFORMED_SHAPES:
            raise ValueError(f"shape must be one of {', '.join(MALFORMED_SHAPES)}")
        if fault.kind == "status" and not 400 <= fault.status <= 599:
            raise ValueError("status must be an HTTP error status (400-599)")
        with self._lock:
            self.faults.append(fault)
        return fault

    def take_fault(self, endpoint: str, clinician: str | None) -> Fault | None:
        """The first fault waiting for this call, one of its `times` used up."""
        with self._lock:
            for fault in self.faults:
                if fault.matches(endpoint, clinician):
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                    return dataclasses.replace(fault)
        return None

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()
        self.wake_all()

    # -- single sign-on -------------------------------------------------------------------------

    def check_sso(self, params: dict[str, str]) -> tuple[bool, str, str]:
        """Verify a LoginSingleSignOn.aspx query as DoseSpot's guide (1.6.1) computes it:
        (accepted, clinician id, reason). A code is accepted once."""
        clinic_id = params.get("SingleSignOnClinicId", "")
        user_id = params.get("SingleSignOnUserId", "")
        code = params.get("SingleSignOnCode", "")
        verify = params.get("SingleSignOnUserIdVerify", "")
        length = params.get("SingleSignOnPhraseLength", "")
        with self._lock:
            key = self.clinics.get(clinic_id)
            if key is None:
                return False, user_id, "Clinician does not have access to clinic"
            if self.clinicians.get(user_id) != clinic_id:
                return False, user_id, "Clinician does not have access to clinic"
            if not length.isdigit() or int(length) != SSO_PHRASE_LENGTH or len(code) <= SSO_PHRASE_LENGTH:
                return False, user_id, "Incorrect SSO calculations"
            phrase = code[:SSO_PHRASE_LENGTH]
            expected_code = phrase + _sha512_base64(phrase + key)
            expected_verify = _sha512_base64(user_id + phrase[:SSO_USER_PHRASE_LENGTH] + key)
            if not (hmac.compare_digest(code, expected_code) and hmac.compare_digest(verify, expected_verify)):
                return False, user_id, "Incorrect SSO calculations"
            if code in self.used_sso_codes:
                return False, user_id, "This single sign-on link was already used"
            self.used_sso_codes[code] = None
            while len(self.used_sso_codes) > 10_000:
                self.used_sso_codes.popitem(last=False)
        return True, user_id, ""
