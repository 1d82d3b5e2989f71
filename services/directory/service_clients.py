"""Service identities: short-lived access tokens for registered service clients (client credentials).

A service client (inbox, notifications, ...) proves itself with its name and secret. Directory
stores only the SHA-256 of each secret (SERVICE_CLIENTS; two per name during a rotation) and compares digests in
constant time;
an unknown name costs the same comparison as a known one, so timing tells nothing about which
names exist. The token is scoped to the agency asked for (which must exist) or, with no agency,
to the platform: such a token reaches platform methods only. Tokens have no session and live
ACCESS_TOKEN_TTL_S like staff tokens; a service asks again shortly before expiry.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from services.directory import domain, tokens
from services.directory.store import DirectoryStore
from services.kit.errors import NotFound, Unauthenticated

log = logging.getLogger(__name__)

MAX_CLIENT_ID_CHARS = 64
MAX_SECRET_CHARS = 1024
_NO_DIGEST = bytes(32)  # compared against for unknown names, so they cost what known ones do


def invalid_client() -> Unauthenticated:
    return Unauthenticated("invalid_client", "the service client id or secret is not valid")


class ServiceClients:
    def __init__(
        self, digests: dict[str, tuple[str, ...]], store: DirectoryStore, keys: tokens.KeySet, ttl_s: int
    ):
        self._digests = {name: [bytes.fromhex(d) for d in listed] for name, listed in digests.items()}
        self.store = store
        self.keys = keys
        self.ttl_s = ttl_s

    def authenticate(self, client_id: str, client_secret: str) -> bool:
        if len(client_id) > MAX_CLIENT_ID_CHARS or len(client_secret) > MAX_SECRET_CHARS:
            return False
        expected = self._digests.get(client_id)
        presented = hashlib.sha256(client_secret.encode("utf-8")).digest()
        matches = False
        for digest in expected or [_NO_DIGEST]:
            matches |= hmac.compare_digest(presented, digest)  # every digest compared: no early exit
        return matches and expected is not None and bool(client_secret)

    def issue(self, client_id: str, client_secret: str, agency_id: str) -> tokens.AccessToken:
        if not self.authenticate(client_id, client_secret):
            log.warning("service token refused", extra={"code": "invalid_client"})
            raise invalid_client()
        if agency_id and (not domain.is_well_formed_id(agency_id) or self.store.get_agency(agency_id) is None):
            raise NotFound("agency_not_found", "no such agency")
        access = tokens.issue_service_token(self.keys, client_id=client_id, agency_id=agency_id, ttl_s=self.ttl_s)
        log.info("service token issued to %s", client_id, extra={"agency_id": agency_id or "platform"})
        return access
