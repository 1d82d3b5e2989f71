"""DoseSpot (RESTful API v2) behind `VendorAdapter`.

Sources: DoseSpot's "RESTful API V2 Authentication Guide" (v1.2, February 2025: token, rate limits,
single sign-on), its API guide section 3.11 Notifications, and the published v2 Swagger
("DoseSpot REST API - Plan: Full + EPCS - V2"). Paths are relative to the practice's API root,
`PracticeCredentials.base_url` (DoseSpot: https://my.staging.dosespot.com/webapi/v2 in staging):

    POST connect/token                     password grant, form body (1.3.1 of the guide)
    GET  api/notifications/counts          PrescriberNotificationCountsResponse (3.11.2)
    GET  api/refills/pending/detailed      PagedListResponse[GetRefillDetailedResponse]
    GET  api/notifications/errors          PagedListResponse[TransmissionErrors] (3.11.1)
    GET  api/prescriptions/pending         ASSUMED: DoseSpot documents no clinician-wide list of
                                           pending prescriptions (only the count); see VENDORS.md
    GET  api/patients/{patientId}          ItemResponse[GetPatient] (names for errors / pending)
    GET  api/patients/{patientId}/prescriptions/{prescriptionId}   PrescriptionResponse

Lists are paged: `pageNumber` (from 1) in the query, `PageResult` (CurrentPage, TotalPages,
HasNext, ...) in the answer; `clinic=Current` keeps them to the token's clinic, as the counts are.

Tokens are asked per (API root, clinic, clinician) and cached until shortly before `expires_in`.
A 401 on a cached token forgets it, asks a new one and retries the request once; a second 401 or
a 403 is `VendorRejected`. Every public operation runs through the circuit breaker of its API root
(services.erx_bridge.resilience). This adapter never retries anything else: it raises
`VendorUnavailable` (with `retry_after_s` from Retry-After; 10 s for a 429 without one, as the
guide's rate-limit section asks) and the sync engine decides when to come back (`backoff_s`).

Secrets (clinic key, tokens, SSO addresses) and PHI (names, medications) are never logged and
never put in an exception message; logs carry the route name, HTTP status and duration only.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import logging
import secrets
import string
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from services.erx_bridge.resilience import CircuitBreakers, parse_retry_after
from services.erx_bridge.vendors.base import (
    KINDS,
    PENDING_PRESCRIPTION,
    REFILL_REQUEST,
    SSO_CONTEXTS,
    SSO_NOTIFICATIONS,
    SSO_PATIENT,
    TRANSACTION_ERROR,
    Counts,
    PracticeCredentials,
    SsoLink,
    VendorItem,
    VendorMalformed,
    VendorRejected,
    VendorUnavailable,
)

__all__ = [
    "DoseSpotAdapter",
    "sso_code",
    "sso_phrase",
    "sso_query",
    "sso_user_id_verify",
]

log = logging.getLogger(__name__)

VENDOR = "dosespot"

TOKEN_PATH = "connect/token"  # noqa: S105 - a path, not a secret
COUNTS_PATH = "api/notifications/counts"
REFILLS_PATH = "api/refills/pending/detailed"
ERRORS_PATH = "api/notifications/errors"
PENDING_PATH = "api/prescriptions/pending"  # assumed, see the module docstring
PATIENT_PATH = "api/patients/{patient_id}"
PRESCRIPTION_PATH = "api/patients/{patient_id}/prescriptions/{prescription_id}"

LIST_PATHS = {REFILL_REQUEST: REFILLS_PATH, TRANSACTION_ERROR: ERRORS_PATH, PENDING_PRESCRIPTION: PENDING_PATH}
ID_PREFIX = {REFILL_REQUEST: "refill", TRANSACTION_ERROR: "error", PENDING_PRESCRIPTION: "pending"}
LIST_ROUTES = {REFILL_REQUEST: "refills", TRANSACTION_ERROR: "errors", PENDING_PRESCRIPTION: "pending"}

# The guide, 1.3.3: "If these limits are exceeded, clients must wait 10 seconds".
RATE_LIMIT_WAIT_S = 10.0
# An answer without expires_in: assume less than the guide's staging lifetime (10 minutes).
DEFAULT_TOKEN_TTL_S = 300.0

# Single sign-on (the guide, 1.6.1).
SSO_PHRASE_LENGTH = 32
SSO_USER_PHRASE_LENGTH = 22
SSO_ALPHABET = string.ascii_letters + string.digits  # "an alpha-numeric random phrase"
SSO_TTL_S = 300.0

_PENDING_DETAIL = {
    "Entered": "awaiting signature",
    "Edited": "awaiting signature",
    "ReadyToSign": "ready to sign",
    "EpcsError": "EPCS signing failed",
    "PharmacyVerified": "awaiting send",
    "PharmacySelect": "pharmacy to choose",
}


# -- single sign-on (pure) ----------------------------------------------------------------------


def sso_phrase(choice: Callable[[str], str] = secrets.choice, length: int = SSO_PHRASE_LENGTH) -> str:
    """The random phrase: `length` alphanumeric characters, each drawn with `choice`."""
    return "".join(choice(SSO_ALPHABET) for _ in range(length))


def _sha512_base64(text: str) -> str:
    encoded = base64.b64encode(hashlib.sha512(text.encode("utf-8")).digest()).decode("ascii")
    # "If there are two '=' signs at the end, remove them." (a SHA-512 digest always has them)
    return encoded[:-2] if encoded.endswith("==") else encoded


def sso_code(phrase: str, clinic_key: str) -> str:
    """SingleSignOnCode ("Encrypted ClinicId"): phrase + Base64(SHA-512(UTF-8(phrase + clinic key)))."""
    return phrase + _sha512_base64(phrase + clinic_key)


def sso_user_id_verify(phrase: str, user_id: str, clinic_key: str) -> str:
    """SingleSignOnUserIdVerify ("Encrypted UserId"):
    Base64(SHA-512(UTF-8(user id + first 22 characters of the phrase + clinic key)))."""
    return _sha512_base64(user_id + phrase[:SSO_USER_PHRASE_LENGTH] + clinic_key)


def sso_query(clinic_id: str, user_id: str, clinic_key: str, phrase: str, *, context: str, patient_id: str = "") -> str:
    """The query string of LoginSingleSignOn.aspx, every value URL-encoded (Base64's '+', '/' too)."""
    if context not in SSO_CONTEXTS:
        raise ValueError(f"unknown single sign-on context: {context!r}")
    params: list[tuple[str, str]] = [("SingleSignOnClinicId", clinic_id), ("SingleSignOnUserId", user_id)]
    if context == SSO_PATIENT:
        if not patient_id:
            raise ValueError("single sign-on to a patient needs the patient id")
        params.append(("PatientId", patient_id))
    params += [
        ("SingleSignOnPhraseLength", str(len(phrase))),
        ("SingleSignOnCode", sso_code(phrase, clinic_key)),
        ("SingleSignOnUserIdVerify", sso_user_id_verify(phrase, user_id, clinic_key)),
    ]
    if context == SSO_NOTIFICATIONS:
        params.append(("RefillsErrors", "1"))
    return urllib.parse.urlencode(params, safe="", quote_via=urllib.parse.quote)


# -- answers to read ------------------------------------------------------------------------------


def _malformed(route: str, what: str) -> VendorMalformed:
    return VendorMalformed(f"{VENDOR} {route}: unexpected answer ({what})")


def _as_dict(value: Any, route: str, what: str) -> dict:
    if not isinstance(value, dict):
        raise _malformed(route, f"{what} is not an object")
    return value


def _opt_dict(obj: dict, key: str, route: str) -> dict | None:
    value = obj.get(key)
    if value is None:
        return None
    return _as_dict(value, route, key)


def _id(obj: dict, key: str, route: str) -> str:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip():
        raise _malformed(route, f"{key} missing or not an id")
    return str(value).strip()


def _opt_id(obj: dict, key: str, route: str) -> str:
    return "" if obj.get(key) in (None, "", 0) else _id(obj, key, route)


def _text(obj: dict | None, key: str, route: str) -> str:
    if obj is None:
        return ""
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _malformed(route, f"{key} is not text")
    return value.strip()


def _count(obj: dict, key: str, route: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _malformed(route, f"{key} is not a count")
    return value


def _when(obj: dict, keys: tuple[str, ...], route: str) -> dt.datetime | None:
    for key in keys:
        value = obj.get(key)
        if value in (None, ""):
            continue
        if not isinstance(value, str):
            raise _malformed(route, f"{key} is not a date")
        try:
            when = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise _malformed(route, f"{key} is not a date") from None
        if when.year <= 1:  # .NET's DateTime.MinValue: "no date"
            continue
        return when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    return None


def _patient_name(patient: dict | None, route: str) -> str:
    if patient is None:
        return ""
    return " ".join(part for part in (_text(patient, "FirstName", route), _text(patient, "LastName", route)) if part)


def _check_result(body: Any, route: str) -> None:
    """DoseSpot's envelope: Result.ResultCode "OK" or "ERROR" (the latter is a refusal)."""
    if isinstance(body, dict) and isinstance(body.get("Result"), dict):
        code = body["Result"].get("ResultCode")
        if isinstance(code, str) and code.strip().upper() == "ERROR":
            # ResultDescription is not repeated: it may name the patient or the clinician.
            raise VendorRejected(f"{VENDOR} {route}: the vendor answered ResultCode ERROR")


def _page(body: Any, page: int, route: str) -> tuple[list[dict], bool]:
    """One page of a PagedListResponse: its items and whether another page follows."""
    body = _as_dict(body, route, "the answer")
    raw_items = body.get("Items")
    if raw_items is None:
        raw_items = []
    if not isinstance(raw_items, list):
        raise _malformed(route, "Items is not a list")
    items = [_as_dict(item, route, "an item") for item in raw_items]
    paging = _opt_dict(body, "PageResult", route)
    if paging is None:
        return items, False
    current = paging.get("CurrentPage")
    if current is not None:
        if isinstance(current, bool) or not isinstance(current, int):
            raise _malformed(route, "PageResult.CurrentPage is not a number")
        if current not in (page, 0):  # 0: an empty list says page 0 of 0
            raise _malformed(route, "PageResult.CurrentPage is not the page asked for")
    has_next = paging.get("HasNext")
    if isinstance(has_next, bool):
        return items, has_next and bool(items)
    total = paging.get("TotalPages")
    if isinstance(total, int) and not isinstance(total, bool):
        return items, page < total and bool(items)
    return items, False


@dataclasses.dataclass
class _Pending:
    """An item read from a list, before its patient's name or medication is looked up."""

    item: VendorItem
    prescription_id: str = ""


def _refill(raw: dict, clinician_id: str, route: str) -> _Pending | None:
    refill_id = _id(raw, "RefillId", route)
    owner = _opt_id(raw, "ClinicianId", route)
    if owner and owner != clinician_id:
        return None  # the list covers the clinic; the counts only this prescriber
    patient = _opt_dict(raw, "Patient", route)
    prescription = None
    for key in ("RequestedPrescription", "DispensedPrescription", "OriginalPrescription"):
        prescription = _opt_dict(raw, key, route)
        if prescription is not None:
            break
    item = VendorItem(
        vendor_item_id=f"{ID_PREFIX[REFILL_REQUEST]}:{refill_id}",
        kind=REFILL_REQUEST,
        patient_id=_opt_id(patient, "PatientId", route) if patient else "",
        patient_name=_patient_name(patient, route),
        medication=_text(prescription, "DisplayName", route),
        requested_at=_when(raw, ("RequestedDate",), route),
        detail="new patient" if raw.get("NewPatient") is True else "",
    )
    return _Pending(item, _opt_id(prescription, "PrescriptionId", route) if prescription else "")


def _transmission_error(raw: dict, route: str) -> _Pending:
    prescription_id = _id(raw, "PrescriptionId", route)
    item = VendorItem(
        vendor_item_id=f"{ID_PREFIX[TRANSACTION_ERROR]}:{prescription_id}",
        kind=TRANSACTION_ERROR,
        patient_id=_opt_id(raw, "PatientId", route),
        patient_name="",
        medication="",
        requested_at=_when(raw, ("ErrorDateTimeStamp", "DateWritten"), route),
        detail=_text(raw, "ErrorDetails", route) or "transmission error",
    )
    return _Pending(item, prescription_id)


def _pending_prescription(raw: dict, route: str) -> _Pending:
    prescription_id = _id(raw, "PrescriptionId", route)
    patient = _opt_dict(raw, "Patient", route)
    status = _text(raw, "Status", route)
    item = VendorItem(
        vendor_item_id=f"{ID_PREFIX[PENDING_PRESCRIPTION]}:{prescription_id}",
        kind=PENDING_PRESCRIPTION,
        patient_id=_opt_id(raw, "PatientId", route) or (_opt_id(patient, "PatientId", route) if patient else ""),
        patient_name=_patient_name(patient, route),
        medication=_text(raw, "DisplayName", route),
        requested_at=_when(raw, ("WrittenDate", "DateWritten"), route),
        detail=_PENDING_DETAIL.get(status, "awaiting signature"),
    )
    return _Pending(item, prescription_id)


@contextlib.contextmanager
def _readable(route: str) -> Iterator[None]:
    """Last guard: whatever shape slipped past the checks is VendorMalformed, never a KeyError."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
        raise _malformed(route, type(exc).__name__) from None


# -- the adapter ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Token:
    value: str = dataclasses.field(repr=False)
    fresh_until: float  # monotonic seconds


class DoseSpotAdapter:
    """One per process: it holds the HTTP session (a connection pool), the tokens and the circuit
    breakers. Thread-safe."""

    name = VENDOR

    def __init__(
        self,
        *,
        subscription_key: str = "",
        connect_timeout_s: float = 3.05,
        read_timeout_s: float = 10.0,
        breakers: CircuitBreakers | None = None,
        session: requests.Session | None = None,
        pool_size: int = 32,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        choice: Callable[[str], str] = secrets.choice,
        token_refresh_margin_s: float = 60.0,
        max_pages: int = 100,
        max_tokens: int = 10_000,
        look_up_details: bool = True,
        sso_ttl_s: float = SSO_TTL_S,
    ):
        self._subscription_key = subscription_key
        self._timeout = (connect_timeout_s, read_timeout_s)
        self._breakers = breakers or CircuitBreakers(clock=clock)
        self._clock = clock
        self._now = now
        self._choice = choice
        self._margin_s = token_refresh_margin_s
        self._max_pages = max_pages
        self._max_tokens = max_tokens
        self._look_up_details = look_up_details
        self._sso_ttl = dt.timedelta(seconds=sso_ttl_s)
        self._tokens: dict[tuple[str, str, str], _Token] = {}
        self._tokens_lock = threading.Lock()
        if session is None:
            session = requests.Session()
            pool = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
            session.mount("https://", pool)
            session.mount("http://", pool)
        self._session = session

    def close(self) -> None:
        self._session.close()

    # -- VendorAdapter ----------------------------------------------------------------------

    def counts(self, practice: PracticeCredentials, clinician_id: str) -> Counts:
        with self._breaker(practice).guard():
            body = self._get(practice, clinician_id, "counts", COUNTS_PATH)
            with _readable("counts"):
                body = _as_dict(body, "counts", "the answer")
                return Counts(
                    refill_requests=_count(body, "RefillRequestsCount", "counts"),
                    transaction_errors=_count(body, "TransactionErrorsCount", "counts"),
                    pending_prescriptions=_count(body, "PendingPrescriptionsCount", "counts"),
                )

    def items(self, practice: PracticeCredentials, clinician_id: str, kind: str) -> list[VendorItem]:
        if kind not in KINDS:
            raise ValueError(f"unknown item kind: {kind!r}")
        route = LIST_ROUTES[kind]
        with self._breaker(practice).guard():
            found: dict[str, _Pending] = {}
            for raw in self._pages(practice, clinician_id, route, LIST_PATHS[kind]):
                with _readable(route):
                    if kind == REFILL_REQUEST:
                        read = _refill(raw, clinician_id, route)
                    elif kind == TRANSACTION_ERROR:
                        read = _transmission_error(raw, route)
                    else:
                        read = _pending_prescription(raw, route)
                if read is not None:
                    found.setdefault(read.item.vendor_item_id, read)  # an item that moved between pages
            pending = list(found.values())
            if self._look_up_details:
                return self._complete(practice, clinician_id, pending)
            return [p.item for p in pending]

    def sso(self, practice: PracticeCredentials, clinician_id: str, context: str, patient_id: str = "") -> SsoLink:
        if context not in SSO_CONTEXTS:
            raise ValueError(f"unknown single sign-on context: {context!r}")
        if not practice.sso_url:
            raise VendorRejected(f"{VENDOR} sso: no single sign-on address configured for the practice")
        if not clinician_id or not practice.clinic_id or not practice.clinic_key:
            raise VendorRejected(f"{VENDOR} sso: clinic id, clinic key and clinician id are all needed")
        query = sso_query(
            practice.clinic_id,
            clinician_id,
            practice.clinic_key,
            sso_phrase(self._choice),
            context=context,
            patient_id=patient_id if context == SSO_PATIENT else "",
        )
        separator = "&" if urllib.parse.urlsplit(practice.sso_url).query else "?"
        url = practice.sso_url.rstrip("?&") + separator + query
        return SsoLink(url=url, expires_at=self._now() + self._sso_ttl)

    # -- HTTP -------------------------------------------------------------------------------

    def _breaker(self, practice: PracticeCredentials):
        return self._breakers.for_key(practice.base_url, name=VENDOR)

    def _url(self, practice: PracticeCredentials, path: str) -> str:
        if not practice.base_url:
            raise VendorRejected(f"{VENDOR}: no API address configured for the practice")
        return practice.base_url.rstrip("/") + "/" + path

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self._subscription_key:
            # The authentication guide names "Subscription-Key"; docs.dosespot.com names Azure API
            # Management's default "Ocp-Apim-Subscription-Key". Both carry the same key.
            headers["Subscription-Key"] = self._subscription_key
            headers["Ocp-Apim-Subscription-Key"] = self._subscription_key
        return headers

    def _send(self, method: str, url: str, route: str, **kwargs: Any) -> requests.Response:
        started = time.monotonic()
        try:
            response = self._session.request(method, url, timeout=self._timeout, allow_redirects=False, **kwargs)
        except requests.Timeout:
            raise VendorUnavailable(f"{VENDOR} {route}: timed out") from None
        except requests.ConnectionError:
            raise VendorUnavailable(f"{VENDOR} {route}: connection failed") from None
        except requests.RequestException as exc:
            raise VendorUnavailable(f"{VENDOR} {route}: request failed ({type(exc).__name__})") from None
        log.debug(
            "dosespot call",
            extra={
                "route": route,
                "status": response.status_code,
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
            },
        )
        return response

    @staticmethod
    def _raise_for_status(response: requests.Response, route: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if status == 429:
            raise VendorUnavailable(
                f"{VENDOR} {route}: rate limited (HTTP 429)",
                retry_after_s=RATE_LIMIT_WAIT_S if retry_after is None else retry_after,
            )
        if status in (401, 403):
            raise VendorRejected(f"{VENDOR} {route}: refused (HTTP {status})")
        if status >= 500 or status == 408:
            raise VendorUnavailable(f"{VENDOR} {route}: HTTP {status}", retry_after_s=retry_after)
        if status >= 400:
            raise VendorRejected(f"{VENDOR} {route}: refused (HTTP {status})")
        raise VendorMalformed(f"{VENDOR} {route}: unexpected HTTP {status}")

    @staticmethod
    def _json(response: requests.Response, route: str) -> Any:
        try:
            body = response.json()
        except ValueError:
            raise _malformed(route, "not JSON") from None
        _check_result(body, route)
        return body

    # -- tokens -----------------------------------------------------------------------------

    @staticmethod
    def _username(practice: PracticeCredentials, clinician_id: str) -> str:
        username = clinician_id or practice.admin_user_id
        if not username:
            raise VendorRejected(f"{VENDOR}: no clinician id to ask a token for")
        return username

    def _token_key(self, practice: PracticeCredentials, username: str) -> tuple[str, str, str]:
        return (practice.base_url.rstrip("/").lower(), practice.clinic_id, username)

    def _token(self, practice: PracticeCredentials, username: str) -> str:
        key = self._token_key(practice, username)
        with self._tokens_lock:
            cached = self._tokens.get(key)
        if cached is not None and self._clock() < cached.fresh_until:
            return cached.value
        token = self._fetch_token(practice, username)
        with self._tokens_lock:
            if len(self._tokens) >= self._max_tokens and key not in self._tokens:
                now = self._clock()
                for stale in [k for k, t in self._tokens.items() if t.fresh_until <= now]:
                    del self._tokens[stale]
                while len(self._tokens) >= self._max_tokens:
                    del self._tokens[next(iter(self._tokens))]
            self._tokens[key] = token
        return token.value

    def _forget_token(self, practice: PracticeCredentials, username: str, value: str) -> None:
        key = self._token_key(practice, username)
        with self._tokens_lock:
            cached = self._tokens.get(key)
            if cached is not None and cached.value == value:
                del self._tokens[key]

    def _fetch_token(self, practice: PracticeCredentials, username: str) -> _Token:
        if not practice.clinic_id or not practice.clinic_key:
            raise VendorRejected(f"{VENDOR} token: clinic id and clinic key are needed")
        started = self._clock()
        form = {
            "grant_type": "password",
            "client_id": practice.clinic_id,
            "client_secret": practice.clinic_key,
            "username": username,
            "password": practice.clinic_key,
            "scope": "api",
        }
        response = self._send("POST", self._url(practice, TOKEN_PATH), "token", data=form, headers=self._headers())
        if response.status_code == 400:
            # OAuth 2.0 (RFC 6749 5.2): invalid_client / invalid_grant. The body is not repeated.
            raise VendorRejected(f"{VENDOR} token: credentials refused (HTTP 400)")
        self._raise_for_status(response, "token")
        with _readable("token"):
            body = _as_dict(self._json(response, "token"), "token", "the answer")
            value = body.get("access_token")
            if not isinstance(value, str) or not value.strip():
                raise _malformed("token", "no access_token")
            lifetime = body.get("expires_in")
            if lifetime is None:
                lifetime = DEFAULT_TOKEN_TTL_S
            elif isinstance(lifetime, str) and lifetime.strip().isdigit():
                lifetime = float(lifetime)
            elif isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
                raise _malformed("token", "expires_in is not a lifetime")
        margin = min(self._margin_s, float(lifetime) / 2.0)
        return _Token(value=value.strip(), fresh_until=started + float(lifetime) - margin)

    # -- authenticated requests -------------------------------------------------------------

    def _get(
        self,
        practice: PracticeCredentials,
        clinician_id: str,
        route: str,
        path: str,
        params: dict[str, str | int] | None = None,
        *,
        missing_ok: bool = False,
    ) -> Any:
        """GET with the clinician's bearer token: one new token and one retry after a 401."""
        username = self._username(practice, clinician_id)
        url = self._url(practice, path)
        token = self._token(practice, username)
        response = self._send("GET", url, route, params=params, headers=self._bearer(token))
        if response.status_code == 401:
            self._forget_token(practice, username, token)
            log.info("dosespot token refused, asking a new one", extra={"route": route})
            token = self._token(practice, username)
            response = self._send("GET", url, route, params=params, headers=self._bearer(token))
            if response.status_code in (401, 403):
                self._forget_token(practice, username, token)
                raise VendorRejected(f"{VENDOR} {route}: refused after a new token (HTTP {response.status_code})")
        if missing_ok and response.status_code == 404:
            return None
        self._raise_for_status(response, route)
        return self._json(response, route)

    def _bearer(self, token: str) -> dict[str, str]:
        return {**self._headers(), "Authorization": f"Bearer {token}"}

    def _pages(self, practice: PracticeCredentials, clinician_id: str, route: str, path: str) -> Iterator[dict]:
        page = 1
        while True:
            if page > self._max_pages:
                raise _malformed(route, f"more than {self._max_pages} pages")
            body = self._get(practice, clinician_id, route, path, {"clinic": "Current", "pageNumber": page})
            with _readable(route):
                items, has_next = _page(body, page, route)
            yield from items
            if not has_next:
                return
            page += 1

    def _complete(self, practice: PracticeCredentials, clinician_id: str, pending: list[_Pending]) -> list[VendorItem]:
        """Fill in what a list leaves out (transmission errors name neither the patient nor the
        medication): one look-up per patient and one per prescription, within this call only."""
        names: dict[str, str] = {}
        done = []
        for entry in pending:
            item = entry.item
            if item.patient_id and not item.patient_name:
                if item.patient_id not in names:
                    names[item.patient_id] = self._look_up_patient(practice, clinician_id, item.patient_id)
                item = dataclasses.replace(item, patient_name=names[item.patient_id])
            if item.patient_id and entry.prescription_id and not item.medication:
                medication = self._look_up_medication(practice, clinician_id, item.patient_id, entry.prescription_id)
                item = dataclasses.replace(item, medication=medication)
            done.append(item)
        return done

    def _look_up_patient(self, practice: PracticeCredentials, clinician_id: str, patient_id: str) -> str:
        path = PATIENT_PATH.format(patient_id=urllib.parse.quote(patient_id, safe=""))
        body = self._get(practice, clinician_id, "patient", path, missing_ok=True)
        if body is None:
            return ""
        with _readable("patient"):
            return _patient_name(_opt_dict(_as_dict(body, "patient", "the answer"), "Item", "patient"), "patient")

    def _look_up_medication(
        self, practice: PracticeCredentials, clinician_id: str, patient_id: str, prescription_id: str
    ) -> str:
        path = PRESCRIPTION_PATH.format(
            patient_id=urllib.parse.quote(patient_id, safe=""),
            prescription_id=urllib.parse.quote(prescription_id, safe=""),
        )
        body = self._get(practice, clinician_id, "prescription", path, missing_ok=True)
        if body is None:
            return ""
        with _readable("prescription"):
            prescription = _opt_dict(_as_dict(body, "prescription", "the answer"), "Prescription", "prescription")
            return _text(prescription, "DisplayName", "prescription")
