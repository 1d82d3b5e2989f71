"""Flask application factory for HTTP edges.

JSON errors only: every error has a stable `code` and a human `message`; no
stack trace and no HTML page ever leaves a service. Request bodies are parsed
strictly (see services.kit.validation), and so is the address: a path or query
string that is not UTF-8 or holds a NUL is 400 `invalid_text` before any route
reads it (a NUL reaches file names and C strings; Werkzeug would turn bad
UTF-8 into replacement characters that then look like ordinary text).

`client_address(trusted)` is the client a request came from: the connection's
peer, or the `X-Real-IP` a trusted peer (the gateway, the web service) states.

Refusals are security events: given the service's `SecurityLog` (`create_app(...,
security_log=...)` or `record_refusals(app, log)`), every 403 the edge answers records
`access_refused` (the caller, `target_type` `http_route`, `target_id` the route's template, never
the concrete path, `reason` the error's code, `source` the client address), and so does a revoked
session's token presented again (401 `session_revoked`, at most once a minute per caller, route
and address: a page left open after sign-out keeps polling). Other 401s are not recorded: a
missing or expired token is everyday traffic, not an incident.

Outages are 503 with `Retry-After`, never 500: a database or broker that cannot be reached
(`services.kit.errors.dependency_outage`) is 503 `database_unavailable` / `broker_unavailable`, a
dependency's `Unavailable` (`directory_unavailable`, ...) is 503 with its code, and every 503 the
kit writes carries `Retry-After` (seconds). The catch-all 500 `internal_error` is left for bugs.

Every app serves `GET /metrics` (Prometheus, services.kit.metrics) and counts each request there by
route template (`unmatched` when no rule matched), method and status, with its latency.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence

import jwt
from flask import Flask, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from services.kit import tracing
from services.kit.auth import KIND_STAFF, AuthError, Identity, TokenVerifier, bearer_token, current_identity
from services.kit.errors import (
    RETRY_AFTER_S,
    DomainError,
    Forbidden,
    InvalidInput,
    Unauthenticated,
    Unavailable,
    dependency_outage,
)
from services.kit.logs import accept_correlation_id, correlation_id_var
from services.kit.metrics import UNMATCHED, install_metrics_route, observe_http
from services.kit.security_events import OncePerWindow, SecurityLog, log_suppressed

log = logging.getLogger("http")

HTTP_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


def error_response(status: int, code: str, message: str, details: dict | None = None):
    """The kit's error body. A 401 says how to authenticate; a 503 says when to try again
    (`Retry-After`, RETRY_AFTER_S unless the caller sets its own)."""
    body = {"code": code, "message": message}
    if details:
        body["details"] = details
    response = jsonify(body)
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="clinic"'
    if status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


class _KitFlask(Flask):
    """Flask, with outages told apart from bugs before any error handler runs: a database or broker
    that cannot be reached (services.kit.errors.dependency_outage) reaches the handlers as the
    `Unavailable` it means (503 `database_unavailable` / `broker_unavailable`), so the kit's handler
    and a blueprint's own (a FHIR route's OperationOutcome) answer it alike, and it is logged as one
    warning, not as an unhandled error with a stack trace."""

    def handle_user_exception(self, e: Exception):
        if not isinstance(e, DomainError):
            outage = dependency_outage(e)
            if outage is not None:
                extra = {"route": _route(), "code": outage.code, "error_type": type(e).__name__}
                log.warning("dependency unavailable", extra=extra)
                e = outage
        return super().handle_user_exception(e)


def create_app(
    service: str,
    verifier: TokenVerifier | None,
    max_body_bytes: int = 256 * 1024,
    *,
    security_log: SecurityLog | None = None,
    trusted_proxies: Sequence[Network] = (),
) -> Flask:
    """The kit's Flask app. `security_log`: where refusals are recorded (none: not recorded; see
    `record_refusals`). `trusted_proxies`: the hops whose `X-Real-IP` names the client in those
    records (`client_address`)."""
    # No static route: a service answers JSON only (the web service adds its own for the page's assets).
    app = _KitFlask(service, static_folder=None)
    app.config.update(MAX_CONTENT_LENGTH=max_body_bytes, JSON_SORT_KEYS=False, PROPAGATE_EXCEPTIONS=False)
    app.json.sort_keys = False
    app.extensions["clinic.verifier"] = verifier
    app.extensions[TRUSTED_PROXIES] = tuple(trusted_proxies)
    if security_log is not None:
        record_refusals(app, security_log)

    @app.before_request
    def _start():
        g.started = time.perf_counter()
        traced = None
        if tracing.enabled():  # the request's span; its trace id is the correlation id
            route = request.url_rule.rule if request.url_rule else UNMATCHED
            attributes = {"http.request.method": request.method, "http.route": route, "service.name": service}
            traced = tracing.start(
                f"{request.method} {route}", "SERVER", carrier=request.headers, attributes=attributes
            )
            request.environ["clinic.trace"] = traced
        g.correlation_id = (
            (traced.trace_id if traced is not None else None)
            or accept_correlation_id(request.headers.get("X-Correlation-ID"))
            or uuid.uuid4().hex
        )
        request.environ["clinic.correlation_token"] = correlation_id_var.set(g.correlation_id)
        check_address_text(request.environ)

    @app.after_request
    def _finish(response):
        response.headers["X-Correlation-ID"] = g.get("correlation_id", "")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        route = request.url_rule.rule if request.url_rule else UNMATCHED
        started = g.get("started")
        seconds = None if started is None else time.perf_counter() - started
        observe_http(service, request.method, route, response.status_code, seconds)
        traced = request.environ.get("clinic.trace")
        if traced is not None:
            traced.span.set_attribute("http.response.status_code", response.status_code)
            request.environ["clinic.trace_status"] = response.status_code
        log.info(
            "request",
            extra={
                "method": request.method,
                "route": route,
                "status": response.status_code,
                "duration_ms": round((seconds or 0.0) * 1000, 2),
            },
        )
        return response

    @app.teardown_request
    def _teardown(_exc):
        # Context tokens live with the request, not in `g`, which a request made inside another shares.
        token = request.environ.pop("clinic.correlation_token", None)
        if token is not None:
            correlation_id_var.reset(token)
        traced = request.environ.pop("clinic.trace", None)
        if traced is not None:
            status = request.environ.get("clinic.trace_status", 500)
            error = type(_exc).__name__ if _exc is not None else (f"HTTP {status}" if status >= 500 else None)
            traced.finish(error=error)
        identity_token = request.environ.pop("clinic.identity_token", None)
        if identity_token is not None:
            current_identity.reset(identity_token)

    @app.errorhandler(DomainError)
    def _domain_error(exc: DomainError):
        if isinstance(exc, Forbidden):
            record_refusal(exc.code)
        elif isinstance(exc, Unauthenticated) and exc.code == SESSION_REVOKED:
            _record_revoked_token(_caller())
        response = error_response(exc.http_status, exc.code, exc.message, exc.details)
        retry_after_s = getattr(exc, "retry_after_s", None)
        if retry_after_s:
            response.headers["Retry-After"] = str(retry_after_s)
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        status = exc.code or 500
        code = HTTP_CODES.get(status, "http_error")
        if status == 403:
            record_refusal(code)
        message = {
            404: "no such resource",
            405: "method not allowed on this resource",
            413: f"request body exceeds {max_body_bytes} bytes",
        }.get(status, exc.description or exc.name)
        response = error_response(status, code, message)
        if status == 405 and getattr(exc, "valid_methods", None):
            response.headers["Allow"] = ", ".join(sorted(exc.valid_methods))  # RFC 9110 §15.5.6
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error", extra={"route": request.url_rule.rule if request.url_rule else "unmatched"})
        return error_response(500, "internal_error", "internal error; the request was not completed")

    @app.get("/healthz")
    def _healthz():
        return {"status": "ok", "service": service}

    install_metrics_route(app)  # Prometheus, on the service's own port only (services.kit.metrics)
    return app


def readiness(checks: Mapping[str, Callable[[], object]], **extra):
    """The answer to `GET /readyz`, one shape for every service: 200 `{"status": "ready",
    "service": <app name>, **extra}` when every check passes, else 503 with the kit's error body,
    code `not_ready`, naming the failing checks (`details.failing`). A check fails by returning a
    falsy value or by raising (a database that does not answer)."""
    failing = []
    for name, check in checks.items():
        try:
            passed = check()
        except Exception:  # noqa: BLE001 - whatever stops the check, the service is not ready
            passed = False
        if not passed:
            failing.append(name)
    if failing:
        return error_response(503, "not_ready", f"not ready: {', '.join(failing)}", {"failing": failing})
    return {"status": "ready", "service": current_app.name, **extra}


def require_auth(view: Callable) -> Callable:
    """Verify the bearer token and expose the caller as `g.identity` (and current_identity)."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        from flask import current_app

        verifier: TokenVerifier = current_app.extensions["clinic.verifier"]
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            return error_response(401, "unauthenticated", "a bearer access token is required")
        try:
            identity = verifier.verify(token)
        except AuthError as exc:
            if exc.code == SESSION_REVOKED:
                _record_revoked_token(_revoked_token_caller(token))
            if exc.code == AUTH_UNAVAILABLE:
                # The check itself could not be made: 503, naming the database when that is why.
                unavailable = dependency_outage(exc) or Unavailable(AUTH_UNAVAILABLE, exc.message)
                return error_response(503, unavailable.code, unavailable.message)
            return error_response(401, exc.code, exc.message)
        if not identity.agency_id:  # HTTP edges serve agency data only
            record_refusal("agency_scope_required", _identity_fields(identity))
            return error_response(403, "agency_scope_required", "a platform-scope token cannot read agency data")
        g.identity = identity
        request.environ["clinic.identity_token"] = current_identity.set(identity)
        return view(*args, **kwargs)

    return wrapper


def require_staff(view: Callable) -> Callable:
    """require_auth for routes that serve a staff member's own data: a service token (agency-scoped,
    no person behind it) is refused with 403 `staff_only`."""

    @require_auth
    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if g.identity.kind != KIND_STAFF:
            raise Forbidden("staff_only", "this route serves staff members")
        return view(*args, **kwargs)

    return wrapper


def check_address_text(environ: Mapping) -> None:
    """400 `invalid_text` unless the path and the query string decode as UTF-8 without a NUL. The
    WSGI path holds the raw bytes as Latin-1 characters (PEP 3333), the query string is still
    percent-encoded; neither is ever echoed back."""
    try:
        path = str(environ.get("PATH_INFO", "")).encode("latin-1").decode("utf-8")
        query = urllib.parse.unquote_to_bytes(str(environ.get("QUERY_STRING", ""))).decode("utf-8")
    except UnicodeError as exc:
        raise InvalidInput("invalid_text", "the request's path or query string is not UTF-8 text") from exc
    if "\x00" in path or "\x00" in query:
        raise InvalidInput("invalid_text", "the request's path or query string holds a NUL character")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(raw: str) -> tuple[Network, ...]:
    """`10.0.0.0/8, 127.0.0.1, ::1` -> networks (a bare address is a /32 or /128); ValueError names
    the first entry that is neither."""
    networks = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise ValueError(f"{item!r} is not an IP address or network") from exc
    return tuple(networks)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address, trusted: Iterable[Network]) -> bool:
    return any(address.version == network.version and address in network for network in trusted)


REAL_IP = "X-Real-IP"


def client_address(trusted: Sequence[Network]) -> str:
    """The address of the client this request is for. A peer in `trusted` (the gateway, which sets
    `X-Real-IP` to the address it was connected from, replacing whatever the client sent, as Kong
    does; the web service, which passes on the address it was given) states it in `X-Real-IP`; from
    any other peer that header is the client's own claim and is ignored: the peer is the client.
    (`X-Forwarded-For` is not read: waitress drops it from requests of peers it does not trust, and
    one stated address per hop is all a hop can vouch for.)"""
    peer = _address(request.remote_addr or "")
    if peer is None:
        return ""
    if _trusted(peer, trusted):
        stated = _address(request.headers.get(REAL_IP, ""))
        if stated is not None:
            return stated.compressed
    return peer.compressed


def address_group(text: str) -> str:
    """The unit a per-address limit counts: an IPv4 address itself, an IPv6 address's /64 network
    (`2001:db8:1:2::/64`). One IPv6 subscriber or host is routinely given a whole /64, so counting
    its 2**64 addresses one by one would give it unlimited tries. Text that is not an address is
    its own group."""
    address = _address(text)
    if address is None:
        return text
    if address.version == 6:
        return ipaddress.ip_network((address, 64), strict=False).compressed
    return address.compressed


# --- refusals recorded as security events ------------------------------------------------------

SECURITY_LOG = "clinic.security_log"
TRUSTED_PROXIES = "clinic.trusted_proxies"
_REVOKED_REPLAYS = "clinic.revoked_token_replays"
SESSION_REVOKED = "session_revoked"
AUTH_UNAVAILABLE = "auth_unavailable"
_AGENCY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def record_refusals(app: Flask, security_log: SecurityLog, trusted_proxies: Sequence[Network] | None = None) -> Flask:
    """Record `app`'s refusals (403, a revoked session's token) in `security_log`, the service's
    own (`ServiceWiring.security_log()`); `trusted_proxies`, when given, replaces the hops whose
    `X-Real-IP` is believed. Returns `app`."""
    app.extensions[SECURITY_LOG] = security_log
    app.extensions[_REVOKED_REPLAYS] = OncePerWindow()
    if trusted_proxies is not None:
        app.extensions[TRUSTED_PROXIES] = tuple(trusted_proxies)
    return app


def request_source() -> str:
    """The client address of this request, through the app's trusted proxies (none: the peer)."""
    return client_address(current_app.extensions.get(TRUSTED_PROXIES, ()))


def _route() -> str:
    return request.url_rule.rule if request.url_rule else "unmatched"


def _identity_fields(identity: Identity) -> dict[str, str]:
    return {"agency_id": identity.agency_id, "actor_id": identity.subject, "actor_kind": identity.kind}


def _caller() -> dict[str, str]:
    """Who the refused request came from: the verified token's holder, else the partner the gateway
    vouched for (services.kit.gateway_identity), else nobody known."""
    identity = g.get("identity") or current_identity.get()
    if identity is not None:
        return _identity_fields(identity)
    partner = g.get("clinic_gateway_partner")
    if partner is not None:
        agency = (request.view_args or {}).get("agency_id")
        known = isinstance(agency, str) and _AGENCY_ID.fullmatch(agency) is not None
        return {"agency_id": agency if known else "", "actor_id": partner.username, "actor_kind": "partner"}
    return {"actor_kind": "anonymous"}


def record_refusal(reason: str, caller: Mapping[str, str] | None = None) -> None:
    """Record one `access_refused` for this request when the app has a security log. A refusal
    stands even when it cannot be recorded (the failure is logged)."""
    security: SecurityLog | None = current_app.extensions.get(SECURITY_LOG)
    if security is None:
        return
    try:
        security.record(
            "access_refused",
            **(caller if caller is not None else _caller()),
            outcome="refused",
            reason=reason,
            target_type="http_route",
            target_id=_route(),
            source=request_source(),
        )
    except Exception:  # noqa: BLE001 - the answer is a refusal either way
        log.error("access refused but not recorded", extra={"code": reason, "route": _route()})


def _revoked_token_caller(token: str) -> dict[str, str]:
    """The holder a revoked session's token names. Its claims are read without checking the
    signature again because the verifier answers `session_revoked` only after the signature,
    issuer, audience, expiry and every claim's shape have held."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return {"actor_kind": "anonymous"}
    agency, subject = claims.get("agency_id"), claims.get("sub")
    return {
        "agency_id": agency if isinstance(agency, str) else "",
        "actor_id": subject if isinstance(subject, str) else "",
        "actor_kind": KIND_STAFF if claims.get("kind", KIND_STAFF) == KIND_STAFF else "service",
    }


def _record_revoked_token(caller: Mapping[str, str]) -> None:
    """A revoked session's token used again: recorded once a minute per (caller, route, address)."""
    replays: OncePerWindow | None = current_app.extensions.get(_REVOKED_REPLAYS)
    if current_app.extensions.get(SECURITY_LOG) is None or replays is None:
        return
    route = _route()
    suppressed = replays.admit((caller.get("actor_id", ""), route, address_group(request_source())))
    if suppressed:
        log_suppressed("access_refused", suppressed, code=SESSION_REVOKED, route=route)
        return
    record_refusal(SESSION_REVOKED, caller)
