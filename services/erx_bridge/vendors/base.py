"""What erx-bridge asks of an ePrescribing vendor: one adapter per vendor implements `VendorAdapter`.

The bridge's sync asks `counts()` first and `items()` only for kinds whose count changed (or
whose content must be checked again); `sso()` builds the single sign-on address of the vendor's
own portal. Every call names the practice's credentials (`PracticeCredentials`: secrets, never
logged, never shown) and the prescriber's clinician id at the vendor.

Failures are typed so the sync can tell "try again later" from "this will never work":
- `VendorUnavailable`: timeouts, connection errors, 5xx, 429 (with `retry_after_s` from
  Retry-After when the vendor sent one), an open circuit. Nothing was learnt; retry later.
- `VendorRejected`: the vendor refused the credentials or the clinician (after one token
  refresh for an expired token). Retrying will not help until someone fixes the settings.
- `VendorMalformed`: the vendor answered something we cannot read. Treated as unavailable for
  this sync (nothing is resolved or changed on the strength of an unreadable answer).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Protocol

# The kinds of vendor item a prescriber must act on (the board's eRx Notifications).
REFILL_REQUEST = "refill_request"
PENDING_PRESCRIPTION = "pending_prescription"  # awaiting the prescriber's signature / send
TRANSACTION_ERROR = "transaction_error"  # incomplete or failed prescription
KINDS = (REFILL_REQUEST, PENDING_PRESCRIPTION, TRANSACTION_ERROR)

# What the single sign-on address opens.
SSO_HOME, SSO_NOTIFICATIONS, SSO_PATIENT = "home", "notifications", "patient"
SSO_CONTEXTS = (SSO_HOME, SSO_NOTIFICATIONS, SSO_PATIENT)


@dataclass(frozen=True)
class PracticeCredentials:
    """One agency's account at the vendor (secrets: never logged, never shown, never stored by us)."""

    vendor: str  # "dosespot"
    base_url: str  # the vendor's API root, e.g. https://my.staging.dosespot.com/webapi
    clinic_id: str
    clinic_key: str = field(repr=False)
    # The vendor's clinician id used to ask for the practice's token (DoseSpot: an admin user id).
    admin_user_id: str = ""
    # The vendor's portal root for single sign-on, e.g. https://my.staging.dosespot.com/LoginSingleSignOn.aspx
    sso_url: str = ""


@dataclass(frozen=True)
class Counts:
    refill_requests: int
    transaction_errors: int
    pending_prescriptions: int

    def of(self, kind: str) -> int:
        return {
            REFILL_REQUEST: self.refill_requests,
            TRANSACTION_ERROR: self.transaction_errors,
            PENDING_PRESCRIPTION: self.pending_prescriptions,
        }[kind]


@dataclass(frozen=True)
class VendorItem:
    """One thing the prescriber must act on, as the vendor describes it. PHI throughout (patient,
    medication, pharmacy): sealed at rest, never logged."""

    vendor_item_id: str  # stable at the vendor for the item's whole life
    kind: str  # one of KINDS
    patient_id: str = field(repr=False)  # the vendor's patient id (for SSO to the patient)
    patient_name: str = field(repr=False)
    medication: str = field(repr=False)
    pharmacy: str = field(default="", repr=False)
    requested_at: dt.datetime | None = None  # when the refill was requested / the Rx written / the error seen
    detail: str = field(default="", repr=False)  # the error text, the pending state ("awaiting signature")


@dataclass(frozen=True)
class SsoLink:
    url: str = field(repr=False)  # a bearer credential: never logged, never stored
    expires_at: dt.datetime


class VendorError(Exception):
    """Base of every vendor failure; the message is safe to log (no PHI, no secrets)."""


class VendorUnavailable(VendorError):
    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class VendorRejected(VendorError):
    pass


class VendorMalformed(VendorUnavailable):
    pass


class VendorAdapter(Protocol):
    name: str

    def counts(self, practice: PracticeCredentials, clinician_id: str) -> Counts:
        """The prescriber's open item counts per kind (one call)."""
        ...

    def items(self, practice: PracticeCredentials, clinician_id: str, kind: str) -> list[VendorItem]:
        """Every open item of one kind for the prescriber (paged by the adapter as the vendor needs)."""
        ...

    def sso(
        self, practice: PracticeCredentials, clinician_id: str, context: str, patient_id: str = ""
    ) -> SsoLink:
        """A short-lived single sign-on address into the vendor's portal for this clinician,
        opening `context` (SSO_CONTEXTS; SSO_PATIENT needs `patient_id`). Pure: no vendor call."""
        ...
