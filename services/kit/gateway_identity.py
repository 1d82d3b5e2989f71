"""Partner identity that only the gateway can vouch for: a per-request token signed with a shared key.

Partner systems (the patient portal, the lab interface, ...) hold no staff token: the gateway
authenticates their API key and passes the consumer on in `X-Consumer-*` headers. A header alone
proves nothing to a service, since anyone who reaches the service's port can send one, so the
gateway also sends `X-Gateway-Identity`:

    v1.<unix seconds>.<nonce: 32 hex>.<base64url, unpadded, of HMAC-SHA256(key, canonical)>

over the canonical text (fields joined by "\\n", header values as sent, "" when absent)

    v1, seconds, nonce, METHOD, request target (path and query as sent upstream),
    hex SHA-256 of the body, X-Consumer-ID, X-Consumer-Custom-ID, X-Consumer-Username,
    X-Credential-Identifier, X-Anonymous-Consumer

A service trusts the consumer headers only when the token verifies with its key, is at most
`MAX_SKEW_S` seconds from its own clock and covers exactly this method, target, body and headers;
it answers 401 otherwise (`gateway_identity_required` without a token, `gateway_identity_invalid`
with a bad one) and records a `forged_identity_refused` security event: the first of each minute
per (address, reason, route) in a process, the others counted in the log only, since anyone who
reaches the port can send them by the thousand. The event names no agency (a path's agency is the
attacker's choice; the record goes to the system's chain). The local gateway
(services/gateway/plugins/identity_signer.py) and Kong (gateway/kong-plugins/clinic-identity-signer)
sign the same way; docs/gateway-identity.md has the test vector both are checked against.

The key is GATEWAY_IDENTITY_KEY (or _FILE), at least 32 characters, required in production and
generated into the run folder in development, where the gateway and the services share it.
GATEWAY_IDENTITY_KEY_PREVIOUS (or _FILE) is also accepted by the services during a rotation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from services.kit.errors import Unauthenticated
from services.kit.settings import Env

log = logging.getLogger(__name__)

HEADER = "X-Gateway-Identity"
VERSION = "v1"
MAX_SKEW_S = 60
MIN_KEY_CHARS = 32
KEY_ENV = "GATEWAY_IDENTITY_KEY"
PREVIOUS_KEY_ENV = "GATEWAY_IDENTITY_KEY_PREVIOUS"
DEV_KEY_FILE = "gateway-identity-key"
# The upstream headers the token covers, in canonical order.
SIGNED_HEADERS = (
    "X-Consumer-ID",
    "X-Consumer-Custom-ID",
    "X-Consumer-Username",
    "X-Credential-Identifier",
    "X-Anonymous-Consumer",
)
# What the service reports to the caller; the security event names the precise reason.
REQUIRED = "gateway_identity_required"
INVALID = "gateway_identity_invalid"
SECURITY_KIND = "forged_identity_refused"

_TOKEN = re.compile(r"^v1\.([0-9]{1,12})\.([0-9a-f]{32})\.([A-Za-z0-9_-]{43})$")
# A claimed consumer name is written to the security event only when it looks like one.
_NAME = re.compile(r"^[A-Za-z0-9._~-]{1,64}$")
# Where an app keeps the refusals it already recorded this minute (services.kit.security_events.OncePerWindow).
_WINDOW = "clinic.forged_identity_window"


def new_key() -> str:
    return secrets.token_urlsafe(32)


def read_keys(env: Env) -> tuple[str, ...]:
    """The current key (GATEWAY_IDENTITY_KEY or _FILE; development: generated into the run folder),
    then the previous one when a rotation is under way. Problems are recorded in `env`."""
    current = env.secret(KEY_ENV, DEV_KEY_FILE, new_key)
    previous = env.given_secret(PREVIOUS_KEY_ENV)
    keys = tuple(key for key in (current, previous) if key)
    for name, key in ((KEY_ENV, current), (PREVIOUS_KEY_ENV, previous)):
        if key and len(key) < MIN_KEY_CHARS:
            env.problems.append(f"{name} must be at least {MIN_KEY_CHARS} characters")
    return keys


# --- the token -------------------------------------------------------------------------------------


def _wire(value: str) -> bytes:
    """A header value or target as its bytes on the wire (WSGI and the gateway keep them as latin-1)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def canonical(method: str, target: str, body: bytes, headers: Mapping[str, str | None], *, ts: int,
              nonce: str) -> bytes:
    """The signed text. `headers` maps the names of SIGNED_HEADERS (any case) to their values."""
    lowered = {name.lower(): value for name, value in headers.items()}
    fields = [
        VERSION.encode(),
        str(ts).encode(),
        nonce.encode(),
        method.upper().encode(),
        _wire(target),
        hashlib.sha256(body).hexdigest().encode(),
        *(_wire(lowered.get(name.lower()) or "") for name in SIGNED_HEADERS),
    ]
    return b"\n".join(fields)


def _mac(key: str, text: bytes) -> str:
    digest = hmac.new(key.encode("utf-8"), text, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def sign(key: str, method: str, target: str, body: bytes, headers: Mapping[str, str | None], *,
         ts: int | None = None, nonce: str | None = None) -> str:
    """The X-Gateway-Identity value for one upstream request."""
    ts = int(time.time()) if ts is None else ts
    nonce = secrets.token_hex(16) if nonce is None else nonce
    return f"{VERSION}.{ts}.{nonce}.{_mac(key, canonical(method, target, body, headers, ts=ts, nonce=nonce))}"


def partner_headers(key: str, method: str, target: str, body: bytes = b"", *, username: str, consumer_id: str = "",
                    custom_id: str = "", credential: str = "", anonymous: bool = False, ts: int | None = None,
                    nonce: str | None = None) -> dict[str, str]:
    """The headers the gateway sends upstream for an authenticated partner, token included (for
    callers that stand in for the gateway: tests, tools)."""
    headers = {
        "X-Consumer-ID": consumer_id,
        "X-Consumer-Custom-ID": custom_id,
        "X-Consumer-Username": username,
        "X-Credential-Identifier": credential,
        "X-Anonymous-Consumer": "true" if anonymous else "",
    }
    headers = {name: value for name, value in headers.items() if value}
    headers[HEADER] = sign(key, method, target, body, headers, ts=ts, nonce=nonce)
    return headers


class Refused(Exception):
    """A token that proves nothing; `reason` is the stable code written to the security event."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def verify(keys: Sequence[str], token: str, *, method: str, target: str, body: bytes,
           headers: Mapping[str, str | None], now: float | None = None, max_skew_s: int = MAX_SKEW_S) -> None:
    """Raise Refused unless `token` was signed with one of `keys` for exactly this request, recently."""
    match = _TOKEN.fullmatch(token.strip())
    if match is None:
        raise Refused("gateway_identity_malformed")
    ts, nonce, mac = int(match.group(1)), match.group(2), match.group(3)
    now = time.time() if now is None else now
    if abs(now - ts) > max_skew_s:
        raise Refused("gateway_identity_expired")
    text = canonical(method, target, body, headers, ts=ts, nonce=nonce)
    if not any(hmac.compare_digest(_mac(key, text), mac) for key in keys if key):
        raise Refused("gateway_identity_bad_signature")


# --- the service side, in Flask ---------------------------------------------------------------------


@dataclass(frozen=True)
class Partner:
    """The consumer the gateway authenticated, as its signed headers name it."""

    username: str
    consumer_id: str
    custom_id: str
    credential: str


def signed_headers(get: Callable[[str], str | None]) -> dict[str, str | None]:
    return {name: get(name) for name in SIGNED_HEADERS}


def request_target(environ: Mapping[str, object]) -> str:
    """The request target as it arrived (waitress and werkzeug keep it raw in REQUEST_URI)."""
    raw = environ.get("REQUEST_URI") or environ.get("RAW_URI")
    if isinstance(raw, str) and raw:
        return raw
    query = environ.get("QUERY_STRING") or ""
    return f"{environ.get('SCRIPT_NAME', '')}{environ.get('PATH_INFO', '')}" + (f"?{query}" if query else "")


def verified_partner(keys: Sequence[str], *, db, service: str, now: Callable[[], float] = time.time) -> Partner:
    """The partner the gateway vouches for in this Flask request, or Unauthenticated (401).

    A consumer header without a token, or a token that fails, records a `forged_identity_refused`
    security event in `db` (the service's database; services.kit.security_events) before refusing.
    """
    from flask import g, request  # here, not at the top: the gateway imports this module to sign only

    cached = g.get("clinic_gateway_partner")
    if cached is not None:
        return cached
    headers = signed_headers(request.headers.get)
    claimed = (headers["X-Consumer-Username"] or "").strip()
    token = request.headers.get(HEADER)
    if not token:
        if any(value for name, value in headers.items() if name != "X-Anonymous-Consumer"):  # an identity claimed
            _refuse(REQUIRED, REQUIRED, claimed, db=db, service=service)
        raise Unauthenticated("unauthenticated", "partner requests must come through the gateway with an API key")
    body = request.get_data(cache=True)
    try:
        verify(keys, token, method=request.method, target=request_target(request.environ), body=body,
               headers=headers, now=now())
    except Refused as exc:
        _refuse(INVALID, exc.reason, claimed, db=db, service=service)
    if not claimed or (headers["X-Anonymous-Consumer"] or "").lower() == "true":
        raise Unauthenticated("unauthenticated", "partner requests must come through the gateway with an API key")
    partner = Partner(
        username=claimed,
        consumer_id=headers["X-Consumer-ID"] or "",
        custom_id=headers["X-Consumer-Custom-ID"] or "",
        credential=headers["X-Credential-Identifier"] or "",
    )
    g.clinic_gateway_partner = partner
    return partner


_MESSAGES = {
    REQUIRED: "a partner identity is accepted only from the gateway; call through the gateway with an API key",
    INVALID: "the gateway's proof of the partner identity does not hold for this request",
}


def _refuse(code: str, reason: str, claimed: str, *, db, service: str) -> NoReturn:
    """Record the forged identity (the first of the minute for this address, reason and route),
    then answer 401 with `code` (never the precise reason)."""
    from flask import current_app, request

    from services.kit.http import address_group, request_source
    from services.kit.security_events import OncePerWindow, SecurityLog, log_suppressed

    route = request.url_rule.rule if request.url_rule else "unmatched"
    source = request_source()
    window = current_app.extensions.setdefault(_WINDOW, OncePerWindow())
    suppressed = window.admit((address_group(source), reason, route))
    if suppressed:
        log_suppressed(SECURITY_KIND, suppressed, code=reason, route=route)
        raise Unauthenticated(code, _MESSAGES[code])
    try:
        SecurityLog(db, service=service).record(
            SECURITY_KIND,
            actor_id=claimed if _NAME.fullmatch(claimed) else "",
            actor_kind="partner",
            outcome="refused",
            reason=reason,
            target_type="http_route",
            target_id=route,
            source=source,
        )
    except Exception:  # noqa: BLE001 - the refusal stands even when it cannot be recorded
        log.error("forged identity refused but not recorded", extra={"code": reason})
    log.warning("partner identity refused", extra={"code": reason, "route": route})
    raise Unauthenticated(code, _MESSAGES[code])
