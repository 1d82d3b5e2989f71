"""Which agency a message belongs to.

- HL7 v2 over MLLP: the receiving facility (MSH-6, first component) names the clinic a message is
  addressed to; NOTIFICATIONS_FACILITIES maps it to an agency. An unknown facility is refused (AR).
- Partner HTTP APIs (FHIR through the gateway): the request names the agency in its path; the
  gateway consumer that sent it (X-Consumer-Username, set by key-auth) must be registered for that
  agency in NOTIFICATIONS_PARTNERS, else 404 agency_not_found (whether or not the agency exists).

Both come from configuration at start (development: the two demo agencies), kept in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import request

from services.kit.errors import NotFound, Unauthenticated
from services.kit.validation import ID_PATTERN


@dataclass(frozen=True)
class Registrations:
    facilities: dict[str, str]
    partners: dict[str, frozenset[str]]

    def agency_for_facility(self, receiving_facility: str) -> str | None:
        return self.facilities.get(receiving_facility)

    def partner_agency(self, consumer: str, agency_id: str) -> str:
        """The agency a partner request names, if this consumer may send for it; 404 otherwise."""
        if not ID_PATTERN.fullmatch(agency_id or "") or agency_id not in self.partners.get(consumer, frozenset()):
            raise NotFound("agency_not_found", "no such agency")
        return agency_id


def gateway_consumer() -> str:
    """The partner the gateway authenticated (key-auth sets X-Consumer-Username and strips any
    client-sent copy). Trusted because the service's HTTP port is reachable from the gateway only."""
    consumer = request.headers.get("X-Consumer-Username", "").strip()
    if not consumer or request.headers.get("X-Anonymous-Consumer", "").lower() == "true":
        raise Unauthenticated("unauthenticated", "partner requests must come through the gateway with an API key")
    return consumer
