"""Flask application factory for HTTP edges.

JSON errors only: every error has a stable `code` and a human `message`; no
stack trace and no HTML page ever leaves a service. Request bodies are parsed
strictly (see services.kit.validation), and so is the address: a path or query
string that is not UTF-8 or holds a NUL is 400 `invalid_text` before any route
reads it (a NUL reaches file names and C strings; Werkzeug would turn bad
UTF-8 into replacement characters that then look like ordinary text).

`client_address(trusted)` is the client a request came from: the connection's
peer, or the `X-Real-IP` a trusted peer (the gateway, the web service) states.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence

from flask import Flask, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from services.kit.auth import KIND_STAFF, AuthError, TokenVerifier, bearer_token, current_identity
from services.kit.errors import DomainError, Forbidden, InvalidInput
from services.kit.logs import accept_correlation_id, correlation_id_var

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
    body = {"code": code, "message": message}
    if details:
        body["details"] = details
    response = jsonify(body)
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="clinic"'
    return response


def create_app(service: str, verifier: TokenVerifier | None, max_body_bytes: int = 256 * 1024) -> Flask:
    app = Flask(service)
    app.config.update(MAX_CONTENT_LENGTH=max_body_bytes, JSON_SORT_KEYS=False, PROPAGATE_EXCEPTIONS=False)
    app.json.sort_keys = False
    app.extensions["clinic.verifier"] = verifier

    @app.before_request
    def _start():
        g.started = time.perf_counter()
        g.correlation_id = accept_correlation_id(request.headers.get("X-Correlation-ID")) or uuid.uuid4().hex
        request.environ["clinic.correlation_token"] = correlation_id_var.set(g.correlation_id)
        check_address_text(request.environ)

    @app.after_request
    def _finish(response):
        response.headers["X-Correlation-ID"] = g.get("correlation_id", "")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        route = request.url_rule.rule if request.url_rule else "unmatched"
        log.info(
            "request",
            extra={
                "method": request.method,
                "route": route,
                "status": response.status_code,
                "duration_ms": round((time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 2),
            },
        )
        return response

    @app.teardown_request
    def _teardown(_exc):
        # Context tokens live with the request, not in `g`, which a request made inside another shares.
        token = request.environ.pop("clinic.correlation_token", None)
        if token is not None:
            correlation_id_var.reset(token)
        identity_token = request.environ.pop("clinic.identity_token", None)
        if identity_token is not None:
            current_identity.reset(identity_token)

    @app.errorhandler(DomainError)
    def _domain_error(exc: DomainError):
        response = error_response(exc.http_status, exc.code, exc.message, exc.details)
        retry_after_s = getattr(exc, "retry_after_s", None)
        if retry_after_s:
            response.headers["Retry-After"] = str(retry_after_s)
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        status = exc.code or 500
        code = HTTP_CODES.get(status, "http_error")
        message = {
            404: "no such resource",
            405: "method not allowed on this resource",
            413: f"request body exceeds {max_body_bytes} bytes",
        }.get(status, exc.description or exc.name)
        return error_response(status, code, message)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error", extra={"route": request.url_rule.rule if request.url_rule else "unmatched"})
        return error_response(500, "internal_error", "internal error; the request was not completed")

    @app.get("/healthz")
    def _healthz():
        return {"status": "ok", "service": service}

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
            status = 503 if exc.code == "auth_unavailable" else 401
            return error_response(status, exc.code, exc.message)
        if not identity.agency_id:  # HTTP edges serve agency data only
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
