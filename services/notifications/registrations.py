"""Which agency a message belongs to.

- HL7 v2 over MLLP: the receiving facility (MSH-6, first component) names the clinic a message is
  addressed to; NOTIFICATIONS_FACILITIES maps it to an agency. An unknown facility is refused (AR).
- Partner HTTP APIs (FHIR through the gateway): the request names the agency in its path; the
  gateway consumer that sent it (X-Consumer-Username, set by key-auth and trusted only with the
  gateway's signed X-Gateway-Identity, services.kit.gateway_identity) must be registered for that
  agency in NOTIFICATIONS_PARTNERS, else 404 agency_not_found (whether or not the agency exists).

Both come from configuration at start (development: the two demo agencies), kept in memory.

A facility's registration also says which PID-3 identifier is the patient's (its identifier type,
CX-5, MR by default, and optionally its assigning authority, CX-4) and, when the facility is in
another time zone than the agency, the zone its unzoned HL7 times are read in.
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass

from flask import current_app

from services.kit import gateway_identity
from services.kit.errors import NotFound
from services.kit.validation import ID_PATTERN


@dataclass(frozen=True)
class Facility:
    """One receiving facility (MSH-6) registered to an agency."""

    agency_id: str
    # PID-3: the identifier whose type (CX-5) and, when named, assigning authority (CX-4) this is.
    patient_id_type: str = "MR"
    patient_id_authority: str = ""
    # Where the facility's unzoned HL7 times are read ("" = the agency's own time zone).
    time_zone: str = ""

    @classmethod
    def from_options(cls, agency_id: str, options: list[str]) -> Facility:
        """From 'patient_id=TYPE[@AUTHORITY]' and 'tz=Area/City' options; ValueError names a bad one."""
        fields: dict[str, str] = {}
        for option in filter(None, options):
            key, _, value = option.partition("=")
            key, value = key.strip(), value.strip()
            if key == "patient_id" and value:
                id_type, _, authority = value.partition("@")
                fields["patient_id_type"], fields["patient_id_authority"] = id_type.strip(), authority.strip()
            elif key == "tz" and value:
                try:
                    zoneinfo.ZoneInfo(value)
                except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
                    raise ValueError(f"unknown time zone {value!r}") from exc
                fields["time_zone"] = value
            else:
                raise ValueError(f"unknown option {option!r} (patient_id=TYPE[@AUTHORITY], tz=Area/City)")
        return cls(agency_id, **fields)


@dataclass(frozen=True)
class Registrations:
    facilities: dict[str, Facility]
    partners: dict[str, frozenset[str]]

    def facility(self, receiving_facility: str) -> Facility | None:
        return self.facilities.get(receiving_facility)

    def agency_for_facility(self, receiving_facility: str) -> str | None:
        facility = self.facilities.get(receiving_facility)
        return facility.agency_id if facility else None

    def partner_agency(self, consumer: str, agency_id: str) -> str:
        """The agency a partner request names, if this consumer may send for it; 404 otherwise."""
        if not ID_PATTERN.fullmatch(agency_id or "") or agency_id not in self.partners.get(consumer, frozenset()):
            raise NotFound("agency_not_found", "no such agency")
        return agency_id


def gateway_consumer() -> str:
    """The partner the gateway authenticated: X-Consumer-Username, believed only when the gateway's
    X-Gateway-Identity token proves it for this very request (anyone reaching this port can send the
    header). 401 otherwise, and a forged one is recorded as a security event."""
    components = current_app.extensions["notifications"]
    return gateway_identity.verified_partner(
        components.settings.gateway_identity_keys, db=components.store.db, service="notifications"
    ).username
