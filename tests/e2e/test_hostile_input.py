"""Hostile input never answers 5xx, on any route of any service (docs/sessions.md).

The routes are every service's own: each service is wired in this process exactly as its process
wires itself (its `__main__.wire`, nothing started), and every rule of the Flask apps it would
serve is sent to, through the route `gateway/kong.yml` gives it (with the credentials that route
asks for: a staff token, a partner's API key) or, when the gateway has none, on the service's own
port. Each hostile JSON body goes to every route taking a body; a route that reads JSON must refuse
it with its stable code (`invalid_text`, `too_deep`); a route that does not read the body answers
as it answers a harmless one. Hostile path segments and query strings get 400 `invalid_text`
everywhere. Nothing ever answers 5xx, and every 4xx is JSON with a code.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from services.gateway import config as gateway_config
from services.gateway.declarative.loader import load_file
from services.gateway.model import GatewayModel, KeyAuthCredential
from services.gateway.router import Router
from services.kit.bootstrap import ServiceWiring
from services.kit.runtime import ServiceProcess
from services.kit.settings import service_client_credentials
from tests.e2e.conftest import Client

REPO = Path(__file__).resolve().parents[2]
# package, process name, service client (None: directory, which issues the tokens)
SERVICES = [
    ("directory", "directory", None),
    ("inbox", "inbox", "inbox"),
    ("notifications", "notifications", "notifications"),
    ("auto_reply", "auto-reply", "auto-reply"),
    ("erx_bridge", "erx-bridge", "erx-bridge"),
    ("cloud_comms", "cloud-comms", "cloud-comms"),
    ("audit", "audit", "audit"),
    ("web", "web", "web"),
]
BODY_METHODS = {"POST", "PUT", "PATCH"}
# Path parameters that must name something real for a request to get as far as its body.
SAMPLE_PARAMS = {"agency_id": "agy_riverbend", "portal_user_id": "portal_riverbend_0001", "kind": "staff", "index": "0"}
EDGE_CODES = {"invalid_text", "too_deep"}


def nested(depth: int) -> bytes:
    return b'{"text": ' + b"[" * depth + b"]" * depth + b"}"


# (body, the code a route that reads it must answer)
HOSTILE_BODIES = [
    pytest.param(rb'{"text": "lone \ud800 surrogate"}', "invalid_text", id="surrogate-escape"),
    pytest.param(rb'{"\udfff": "in a name"}', "invalid_text", id="surrogate-in-name"),
    pytest.param(b'{"text": "raw \xed\xa0\x80 bytes"}', "invalid_text", id="surrogate-as-utf8"),
    pytest.param(rb'{"text": "nul \u0000 inside"}', "invalid_text", id="nul"),
    pytest.param(rb'{"text": {"deeper": ["\u0000"]}}', "invalid_text", id="nul-nested"),
    pytest.param(nested(100), "too_deep", id="nested-100"),
    pytest.param(nested(5000), "too_deep", id="nested-5000"),  # past the parser's own stack
]
HARMLESS_BODY = b'{"text": "harmless"}'
HOSTILE_SEGMENTS = [pytest.param("%00", id="nul"), pytest.param("%ED%A0%80", id="surrogate-as-utf8")]
HOSTILE_QUERIES = [
    pytest.param("q=%00", id="nul"),
    pytest.param("q=%ED%A0%80", id="surrogate-as-utf8"),
    pytest.param("limit=1%00", id="nul-in-a-known-parameter"),
    pytest.param("q%00=1", id="nul-in-a-name"),
]


# --- every route of every service ------------------------------------------------------------------


class _KeepSharedClients(ServiceProcess):
    """The collector's process: stopping it closes what wiring opened, but not the process-wide
    MongoDB client, which the rest of the test session shares."""

    def on_stop(self, name, stop, **options):
        if name != "mongo":
            super().on_stop(name, stop, **options)


class RouteCollector(ServiceWiring):
    """A service wired as its process wires it, keeping its Flask apps and starting nothing."""

    def __init__(self, name, settings, credentials):
        super().__init__(name, settings, credentials=credentials, process=_KeepSharedClients(name))
        self.apps = []

    def http(self, app, port, **_options):
        self.apps.append(app)

    def relay(self, *_args, **_options):
        return None

    def grpc(self, *_args, **_options):
        pass

    def grpc_server(self, *_args, **_options):
        pass

    def listener(self, *_args, **_options):
        pass

    def worker(self, *_args, **_options):
        pass

    def workers(self, *_args, **_options):
        pass


@dataclass(frozen=True)
class Endpoint:
    service: str
    method: str
    rule: str
    path: str  # with harmless values in its parameters
    base_url: str  # the gateway, or the service's own port when the gateway has no route to it
    headers: dict = field(hash=False)

    def url(self, path: str | None = None, query: str = "") -> str:
        return f"{self.base_url}{path or self.path}" + (f"?{query}" if query else "")

    def __str__(self) -> str:
        return f"{self.service} {self.method} {self.rule}"


_PARAM = re.compile(r"<(?:[a-z]+:)?([a-z_]+)>")


def concrete(rule: str, value: str | None = None) -> str:
    """The rule with every parameter filled: `value` (raw, already percent-encoded), or a harmless one."""
    return _PARAM.sub(lambda m: value if value is not None else SAMPLE_PARAMS.get(m.group(1), "hostile1"), rule)


def service_apps(stack) -> list[tuple[str, int, object]]:
    """(service, its HTTP port, Flask app) for every app every service serves."""
    env = stack.service_env()
    # Servers that wiring binds at once (gRPC, MLLP, SMTP): any free port, as nothing is served.
    env.update({name: "0" for name in env if name.endswith(("_GRPC_PORT", "_MLLP_PORT", "_SMTP_PORT"))})
    apps = []
    for package, name, client_id in SERVICES:
        if not (REPO / "services" / package / "__main__.py").exists():
            continue
        main = importlib.import_module(f"services.{package}.__main__")
        settings = importlib.import_module(f"services.{package}.config").load(env)
        credentials = service_client_credentials(client_id, env) if client_id else None
        collector = RouteCollector(name, settings, credentials)
        try:
            main.wire(collector)
            apps += [(name, settings.http_port, app) for app in collector.apps]
        finally:
            collector.process.stop()
    return apps


def route_credentials(model: GatewayModel, route, staff_token: str) -> dict[str, str]:
    """What the gateway route asks for: a partner's API key (from a consumer its acl allows) or a staff token."""
    plugins = {p.name: p for p in model.plugins if p.route is route and p.enabled}
    if "key-auth" in plugins:
        allowed = set(plugins["acl"].config.get("allow") or []) if "acl" in plugins else None
        for key, credential in model.keyauth_credentials.items():
            assert isinstance(credential, KeyAuthCredential)
            if allowed is None or allowed & set(credential.consumer.groups):
                return {"apikey": key}
        pytest.fail(f"no consumer may use route {route.name}")
    return {"Authorization": f"Bearer {staff_token}"}


@pytest.fixture(scope="module")
def endpoints(stack) -> list[Endpoint]:
    # The file as the stack's gateway loads it (its settings: the DECK_* values and the vault's).
    settings = gateway_config.load({**stack.service_env(), **stack.gateway_env()})
    model = load_file(Path(settings.config_path), settings.deck_env, settings.vault_env)
    router = Router(model.routes)
    admin = Client(stack.gateway_url, "admin")
    # The page's sign-in routes want a same-origin request (services/web/sessions.py).
    page = {"X-Clinic-CSRF": "1", "Origin": stack.gateway_url}
    found = []
    for service, port, app in service_apps(stack):
        for rule in app.url_map.iter_rules():
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
                path = concrete(rule.rule)
                match = router.match(method, path)
                if match is not None and match.route.service.port == port:
                    base, headers = stack.gateway_url, route_credentials(model, match.route, admin.token)
                else:  # not exposed through the gateway: the service's own port
                    base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {admin.token}"}
                found.append(Endpoint(service, method, rule.rule, path, base, {**headers, **page}))
    assert len({e.service for e in found}) >= 7 and len(found) > 100, "the services' routes were not all found"
    return found


@pytest.fixture(scope="module")
def http():
    session = requests.Session()
    yield session
    session.close()


def send(http, endpoint: Endpoint, body: bytes | None = None, *, path: str | None = None, query: str = ""):
    headers = dict(endpoint.headers)
    if body is not None:
        headers["Content-Type"] = "application/json"
    return http.request(
        endpoint.method, endpoint.url(path, query), data=body, headers=headers, timeout=30, allow_redirects=False,
        stream=True,  # the event stream answers 200 and stays open: only its status is read
    )


def answer(reply: requests.Response) -> tuple[int, str]:
    """(status, code); a 4xx must be JSON with a code (or, from the gateway itself, a message)."""
    status = reply.status_code
    if status < 400:
        reply.close()
        return status, ""
    body = reply.json()
    assert isinstance(body, dict) and (body.get("code") or body.get("message")), f"{status} {body}"
    return status, body.get("code") or f"gateway: {body.get('message')}"


def failures_of(results: list[tuple[Endpoint, tuple[int, str], str]]) -> list[str]:
    return [f"{endpoint}: {status} {code} ({why})" for endpoint, (status, code), why in results if why]


# --- the tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "code"), HOSTILE_BODIES)
def test_every_route_taking_a_body_refuses_hostile_json_with_a_stable_code(endpoints, http, body, code):
    results = []
    refused_at_the_edge = 0
    for endpoint in (e for e in endpoints if e.method in BODY_METHODS):
        baseline = answer(send(http, endpoint, HARMLESS_BODY))
        got = answer(send(http, endpoint, body))
        why = ""
        if got[0] >= 500:
            why = "a 5xx"
        elif baseline[0] in (400, 415, 422) and got != (400, code):
            why = f"reads JSON (a harmless body: {baseline[0]} {baseline[1]}) but did not refuse this one"
        elif got != baseline and got != (400, code):
            why = f"a harmless body gets {baseline}"
        refused_at_the_edge += got == (400, code)
        results.append((endpoint, got, why))
    assert not failures_of(results), "\n".join(failures_of(results))
    assert refused_at_the_edge >= 40, "most routes taking JSON should have read this body"


# The routes that answered 500 to these bodies before the edge refused them: each must refuse them itself.
MUST_REFUSE = [
    ("POST", "/api/v1/auth/token"),
    ("POST", "/app/session"),
    ("POST", "/api/v1/messages"),
    ("POST", "/api/v1/labels"),
    ("POST", "/api/v1/reminders"),
    ("PUT", "/api/v1/auto-replies/me/<kind>"),
    ("POST", "/api/v1/partner/lab/<agency_id>/DiagnosticReport"),
    ("PUT", "/api/v1/partner/schedule/<agency_id>/Appointment/<appointment_id>"),
]


@pytest.mark.parametrize(("body", "code"), HOSTILE_BODIES)
def test_the_routes_that_used_to_fail_refuse_hostile_json(stack, endpoints, http, body, code):
    by_rule = {(e.method, e.rule): e for e in endpoints}
    for method, rule in MUST_REFUSE:
        endpoint = by_rule[(method, rule)]
        assert endpoint.base_url == stack.gateway_url
        reply = send(http, endpoint, body)
        assert (reply.status_code, reply.json()["code"]) == (400, code), f"{method} {rule}: {reply.text[:300]}"
        if "/partner/lab/" in rule or "/partner/schedule/" in rule:  # FHIR routes keep their own shape
            assert reply.headers["Content-Type"].startswith("application/fhir+json")
            assert reply.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("segment", HOSTILE_SEGMENTS)
def test_hostile_path_segments_are_refused_on_every_route(endpoints, http, segment):
    results = []
    for endpoint in endpoints:
        path = concrete(endpoint.rule, segment) if "<" in endpoint.rule else f"{endpoint.path.rstrip('/')}/{segment}"
        got = answer(send(http, endpoint, path=path))
        why = "" if got == (400, "invalid_text") else "expected 400 invalid_text"
        results.append((endpoint, got, why))
    assert not failures_of(results), "\n".join(failures_of(results))


@pytest.mark.parametrize("query", HOSTILE_QUERIES)
def test_hostile_query_strings_are_refused_on_every_route(endpoints, http, query):
    results = []
    for endpoint in endpoints:
        got = answer(send(http, endpoint, query=query))
        why = "" if got == (400, "invalid_text") else "expected 400 invalid_text"
        results.append((endpoint, got, why))
    assert not failures_of(results), "\n".join(failures_of(results))
