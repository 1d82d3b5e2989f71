"""The web service's HTTP edge: the Message Board page, its sign-in endpoints and the published
OpenAPI documents (docs/api.md). The page's event stream has a server of its own
(services.web.event_server)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from pathlib import Path

from flask import Blueprint, Flask, Response, current_app, g, request

from services.kit.auth import TokenVerifier
from services.kit.errors import NotFound
from services.kit.http import Network, create_app, readiness
from services.kit.validation import json_body
from services.web.assets import Assets, asset_response, page_response
from services.web.live import Hub
from services.web.openapi_merge import merge, reference_page
from services.web.sessions import DirectorySessions, check_same_origin

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Every service's OpenAPI document: services/<service>/openapi.yaml.
SERVICES_DIR = Path(__file__).resolve().parents[1]
OPENAPI_MEDIA_TYPE = "application/yaml"
# No inline script or style anywhere in the page: everything comes from this origin's files.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "manifest-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}

# Sent only on a response to a request that reached the system over HTTPS: a browser ignores it over
# HTTP, and sending it there would pin a development host name that only speaks HTTP.
STRICT_TRANSPORT_SECURITY = "max-age=31536000; includeSubDomains"


def reached_over_https(trusted: Sequence[Network]) -> bool:
    """The client's connection was HTTPS: to this process itself, or as a trusted hop states it
    (`forwarded_https`)."""
    if request.scheme == "https":
        return True
    return forwarded_https(request.remote_addr or "", request.headers.get("X-Forwarded-Proto", ""), trusted)


def forwarded_https(peer_address: str, forwarded_proto: str, trusted: Sequence[Network]) -> bool:
    """A trusted hop (the gateway, which sets it from the connection it accepted, as Kong does)
    states in X-Forwarded-Proto that the client's connection was HTTPS. From any other peer the
    header is the client's own claim and is ignored."""
    try:
        peer = ipaddress.ip_address(peer_address.strip("[]"))
    except ValueError:
        return False
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped
    if not any(peer.version == network.version and peer in network for network in trusted):
        return False
    # The hop's own statement is the last one: earlier values came from whoever connected to it.
    return forwarded_proto.rsplit(",", maxsplit=1)[-1].strip().lower() == "https"


page = Blueprint("page", __name__)
session = Blueprint("session", __name__, url_prefix="/app")
openapi = Blueprint("openapi", __name__, url_prefix="/api/v1/openapi")
# The one document for the whole API: `/api/v1/openapi.json`, beside the per-service ones.
openapi_merged = Blueprint("openapi_merged", __name__)


def published_documents(root: Path = SERVICES_DIR) -> dict[str, bytes]:
    """service name (its folder, e.g. `auto_reply`) -> its OpenAPI document, read once at start:
    requests never name a file, they pick one of these."""
    return {path.parent.name: path.read_bytes() for path in sorted(root.glob("*/openapi.yaml"))}


def build_app(
    sessions: DirectorySessions,
    hub: Hub,
    verifier: TokenVerifier,
    settings,
    live_ready=None,
    *,
    documents: Mapping[str, bytes] | None = None,
    assets: Assets | None = None,
) -> Flask:
    """`live_ready()` says whether delivery events are being consumed (readiness); None: always.
    `documents`: the OpenAPI documents served (default `published_documents()`); `assets`: the
    page's files (default: read from STATIC_DIR now)."""
    app = create_app("web", verifier, max_body_bytes=16 * 1024)
    app.add_url_rule("/static/<path:filename>", endpoint="static", view_func=static_file)
    # Runs after the kit's own hook (Flask runs them last-registered first), which sets no-store on
    # every answer: only an asset's answer says otherwise.
    app.after_request_funcs.setdefault(None, []).insert(0, _asset_cache_control)
    app.extensions["web"] = {
        "assets": Assets(STATIC_DIR) if assets is None else assets,
        "sessions": sessions,
        "hub": hub,
        "settings": settings,
        "openapi": dict(published_documents() if documents is None else documents),
    }
    app.register_blueprint(page)
    app.register_blueprint(session)
    app.register_blueprint(openapi)
    app.register_blueprint(openapi_merged)

    @app.after_request
    def _page_headers(response: Response) -> Response:
        for name, value in PAGE_HEADERS.items():
            response.headers.setdefault(name, value)
        if reached_over_https(settings.trusted_proxies):
            response.headers["Strict-Transport-Security"] = STRICT_TRANSPORT_SECURITY
        return response

    @app.get("/readyz")
    def _readyz():
        # Not consuming delivery events yet: pages would miss live updates.
        checks = {"delivery_events": live_ready} if live_ready is not None else {}
        return readiness(checks, event_streams=hub.streams)

    return app


def _web(name: str):
    return current_app.extensions["web"][name]


@page.get("/")
def index():
    """The page naming its assets by their hashes (never cached itself: it is what names them)."""
    assets: Assets = _web("assets")
    response = page_response(assets, request)
    response.headers["Content-Security-Policy"] = assets.page_policy(CONTENT_SECURITY_POLICY)
    return response


def static_file(filename: str):
    """An asset by its hashed name (cached for a year) or its plain one (revalidated), gzip when accepted."""
    found = _web("assets").find(filename)
    if found is None:
        raise NotFound("not_found", "no such file")
    response, g.asset_cache_control = asset_response(*found, request)
    return response


def _asset_cache_control(response: Response) -> Response:
    cache_control = g.get("asset_cache_control")
    if cache_control is not None:
        response.headers["Cache-Control"] = cache_control
    return response


@session.post("/session")
def sign_in():
    check_same_origin(_web("settings").allowed_origins)
    body = json_body()
    return _web("sessions").sign_in(body.get("username"), body.get("password"))


@session.post("/session/refresh")
def refresh():
    check_same_origin(_web("settings").allowed_origins)
    # ?probe=1: the page's check on load; no session is then an answer (204), not an error.
    return _web("sessions").refresh(probe=request.args.get("probe") == "1")


@session.post("/session/logout")
def sign_out():
    check_same_origin(_web("settings").allowed_origins)
    return _web("sessions").sign_out()


@session.post("/activity")
def activity():
    """The page's user is active (keyboard, pointer, the page shown again); the page reports it at
    most twice a minute. Only this moves the session's idle deadline at directory: token refreshes,
    API reads and this event stream do not. Bearer token, so no cookie and no CSRF check."""
    return _web("sessions").activity()


@openapi.get("")
def openapi_index():
    """The published documents, one per service (public: they describe the API, not its data)."""
    names = sorted(_web("openapi"))
    return {"documents": [{"service": name, "url": f"{openapi.url_prefix}/{name}.yaml"} for name in names]}


@openapi.get("/<service>.yaml")
def openapi_document(service: str):
    documents: dict[str, bytes] = _web("openapi")
    if service not in documents:
        raise NotFound("not_found", "no such document")
    return Response(documents[service], content_type=f"{OPENAPI_MEDIA_TYPE}; charset=utf-8")


def _merged_document() -> dict:
    """The published documents merged into one (services.web.openapi_merge), made once per app."""
    web = current_app.extensions["web"]
    if "openapi_merged" not in web:
        web["openapi_merged"] = merge(web["openapi"])
    return web["openapi_merged"]


@openapi_merged.get("/api/v1/openapi.json")
def openapi_merged_document():
    """Every operation the gateway routes, from every service's document, as one OpenAPI 3.1 document."""
    return _merged_document()


@openapi.get("/reference")
def openapi_reference():
    """The merged document as a page: every operation by service, with no script or style of its own."""
    web = current_app.extensions["web"]
    if "openapi_reference" not in web:
        web["openapi_reference"] = reference_page(_merged_document())
    return Response(web["openapi_reference"], content_type="text/html; charset=utf-8")
