"""The published OpenAPI documents (services/<service>/openapi.yaml, docs/api.md): each one is valid
OpenAPI 3.1 whose schemas are valid JSON Schema 2020-12, and it documents exactly the routes its
service's Flask app has, method by method: no route left out, none documented that does not exist.

The apps are built as each service's `__main__` builds them (the real blueprints and features),
with stand-ins for the parts a route only uses when it runs (store, clients, settings): a URL map
does not depend on them, and nothing is started.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import jsonschema_rs
import pytest
import schemathesis
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask
from schemathesis.core.result import Err
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

from services.gateway.declarative.loader import load_file
from services.gateway.router import Router

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
# Whose document is still being written: each of these must have none yet (so this list is emptied the
# moment they arrive, and from then on they are checked like every other).
PENDING: frozenset[str] = frozenset()


def document_path(service: str) -> Path:
    return ROOT / "services" / service / "openapi.yaml"


def _features(components: MagicMock, features) -> list:
    """Each feature as the service constructs it, without its constructor's own work (collections,
    consumers): `blueprints()` needs only `components`."""
    built = []
    for cls in features:
        feature = cls.__new__(cls)
        feature.components = components
        built.append(feature)
    return built


def _components(features=()) -> MagicMock:
    components = MagicMock()
    components.settings.max_request_bytes = 64 * 1024
    components.settings.trusted_proxies = ()
    components.features = _features(components, features)
    return components


def directory_app() -> Flask:
    from services.directory.http_api import create_directory_app

    return create_directory_app(_components())


def web_app() -> Flask:
    from services.web.http_api import build_app

    return build_app(MagicMock(), MagicMock(), None, MagicMock())


def audit_app() -> Flask:
    from services.audit.http_api import create_app
    from services.audit.service import FEATURES

    return create_app(_components(FEATURES), None)


def auto_reply_app() -> Flask:
    from services.auto_reply.http_api import build_app

    return build_app(MagicMock(), MagicMock(), None, max_body_bytes=64 * 1024)


def erx_bridge_app() -> Flask:
    from services.erx_bridge.http_api import create_app

    return create_app(_components(), None)


def inbox_app() -> Flask:
    from services.inbox.http_api import build_app
    from services.inbox.service import FEATURES

    return build_app(_components(FEATURES), None)


def notifications_app() -> Flask:
    from services.notifications.http_api import create_app
    from services.notifications.service import FEATURES

    return create_app(_components(FEATURES), None)


def cloud_comms_app() -> Flask:
    from services.cloud_comms.http_api import create_app
    from services.cloud_comms.service import FEATURES

    return create_app(_components(FEATURES), None)


APPS: dict[str, Callable[[], Flask]] = {
    "directory": directory_app,
    "web": web_app,
    "audit": audit_app,
    "auto_reply": auto_reply_app,
    "erx_bridge": erx_bridge_app,
    "inbox": inbox_app,
    "notifications": notifications_app,
    "cloud_comms": cloud_comms_app,
}
DOCUMENTED = sorted(set(APPS) - PENDING)


def load(service: str) -> dict:
    return yaml.safe_load(document_path(service).read_text(encoding="utf-8"))


def operations(document: dict) -> Iterator[tuple[str, str, dict]]:
    for path, item in document.get("paths", {}).items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


# --- which services have a document ------------------------------------------------------------


def test_every_service_with_an_http_edge_is_known_here():
    """A new service (one with an http_api.py) must be added to APPS, and so get a document."""
    edges = {path.parent.name for path in (ROOT / "services").glob("*/http_api.py")}
    assert edges == set(APPS)


@pytest.mark.parametrize("service", DOCUMENTED)
def test_the_service_has_a_document(service):
    assert document_path(service).is_file(), f"services/{service}/openapi.yaml is missing"


def test_a_pending_service_has_no_document_yet():
    arrived = [service for service in sorted(PENDING) if document_path(service).exists()]
    assert arrived == [], f"these services have a document now: remove them from PENDING: {arrived}"


# --- each document is valid OpenAPI 3.1 ----------------------------------------------------------


def _schemas(node: Any, where: str = "#") -> Iterator[tuple[str, dict]]:
    """Every Schema Object of an OpenAPI document: components' schemas, and the `schema` of every
    parameter, header and media type."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}/{key}"
            if key == "schema" and isinstance(value, dict):
                yield here, value
            elif key == "schemas" and where == "#/components" and isinstance(value, dict):
                for name, schema in value.items():
                    yield f"{here}/{name}", schema
            else:
                yield from _schemas(value, here)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _schemas(value, f"{where}/{index}")


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _resolve(document: dict, ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref}: only references inside the document (each one is self-contained)"
    node: Any = document
    for token in ref[2:].split("/"):
        part = token.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


@pytest.fixture(params=DOCUMENTED)
def document(request) -> tuple[str, dict]:
    return request.param, load(request.param)


def test_the_document_is_valid_openapi_3_1(document):
    service, raw = document
    assert raw["openapi"] == "3.1.0"
    errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in OPENAPI_31_VALIDATOR.iter_errors(raw)]
    assert errors == [], f"{service}: {errors[:5]}"


def test_every_schema_is_valid_json_schema_2020_12(document):
    service, raw = document
    invalid = []
    for where, schema in _schemas(raw):
        try:
            jsonschema_rs.meta.validate(schema)
        except jsonschema_rs.ValidationError as exc:
            invalid.append(f"{where}: {exc.message}")
    assert invalid == [], f"{service}: {invalid}"


def test_every_reference_resolves(document):
    service, raw = document
    for ref in _refs(raw):
        _resolve(raw, ref)


def test_schemathesis_reads_every_operation(document):
    """What the e2e run (tests/e2e/test_schemathesis.py) loads: every operation, none refused."""
    service, raw = document
    schema = schemathesis.openapi.from_dict(raw)
    problems = [str(result.err()) for result in schema.get_all_operations() if isinstance(result, Err)]
    assert problems == [], f"{service}: {problems}"
    assert len(schema) == len(list(operations(raw)))


def test_every_operation_is_complete(document):
    """Each operation has a unique operationId, says who may call it (`security`, its own or the
    document's; `[]` for anyone), answers at least one documented status, and says whether the gateway
    routes it."""
    service, raw = document
    ids = [op.get("operationId") for _, _, op in operations(raw)]
    assert None not in ids and len(ids) == len(set(ids)), f"{service}: operationIds missing or repeated"
    for path, method, op in operations(raw):
        where = f"{service} {method.upper()} {path}"
        assert "security" in op or "security" in raw, f"{where}: no security"
        assert op.get("responses"), f"{where}: no responses"
        assert op.get("x-clinic-gateway", True) in (True, False), f"{where}: x-clinic-gateway must be a boolean"
    schemes = raw.get("components", {}).get("securitySchemes", {})
    requirements = [op.get("security", raw.get("security", [])) for _, _, op in operations(raw)]
    used = {name for security in requirements for requirement in security for name in requirement}
    assert used <= set(schemes), f"{service}: undeclared security schemes {used - set(schemes)}"


def test_the_error_shape_is_the_kits(document):
    """`Error` is every service's error body (services/kit/http.py error_response)."""
    service, raw = document
    error = raw["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"code", "message"}
    assert set(error["properties"]) == {"code", "message", "details"}


# --- the document and the service agree, route by route ----------------------------------------

_CONVERTER = re.compile(r"<(?:[a-z_]+:)?([A-Za-z_][A-Za-z0-9_]*)>")


def flask_routes(app: Flask) -> set[tuple[str, str]]:
    """(OpenAPI path template, method) of every rule (a kit app has no static route; web adds its own)."""
    routes = set()
    for rule in app.url_map.iter_rules():
        path = _CONVERTER.sub(r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routes.add((path, method.lower()))
    return routes


def other_routes(service: str) -> set[tuple[str, str]]:
    """Routes a service serves beside its Flask app: web's event stream has a server of its own."""
    if service == "web":
        from services.web.event_server import ROUTES

        return set(ROUTES)
    return set()


def test_the_document_has_exactly_the_services_routes(document):
    service, raw = document
    served = flask_routes(APPS[service]()) | other_routes(service)
    documented = {(path, method) for path, method, _ in operations(raw)}
    assert sorted(served - documented) == [], f"{service}: routes without an operation"
    assert sorted(documented - served) == [], f"{service}: operations without a route"


# The gateway's services in front of each service's routes (when not the service's own name).
KONG_SERVICES = {
    "auto_reply": {"auto-reply"},
    "erx_bridge": {"erx-bridge"},
    "cloud_comms": {"cloud-comms"},
    "web": {"web", "web-events"},  # web-events: its event stream server's port
}


@pytest.fixture(scope="module")
def gateway_router() -> Router:
    """gateway/kong.yml's routes, as the gateway (and Kong) match them; each service's URL names it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    services = ["directory", "inbox", "notifications", "auto_reply", "erx_bridge", "cloud_comms", "audit", "web"]
    services.append("web_events")  # web's event stream server
    environ = {f"DECK_{name.upper()}_URL": f"http://{name}.invalid:8000" for name in services}
    environ |= {
        "DECK_DIRECTORY_JWT_PUBLIC_KEY": pem.decode(),
        "DECK_PATIENT_PORTAL_API_KEY": "portal-key",
        "DECK_LAB_INTERFACE_API_KEY": "lab-key",
        "DECK_PRACTICE_MANAGEMENT_API_KEY": "practice-key",
        "DECK_COMPLIANCE_TRACKER_API_KEY": "compliance-key",
        "DECK_DASHBOARDS_API_KEY": "dashboards-key",
        "DECK_RATE_LIMIT_MINUTE": "600",
        "DECK_AUTH_RATE_LIMIT_MINUTE": "30",
        "DECK_PATIENT_PORTAL_RATE_LIMIT_MINUTE": "600",
        "DECK_LAB_INTERFACE_RATE_LIMIT_MINUTE": "600",
        "DECK_PRACTICE_MANAGEMENT_RATE_LIMIT_MINUTE": "600",
        "DECK_COMPLIANCE_TRACKER_RATE_LIMIT_MINUTE": "600",
        "DECK_CORS_ORIGIN": "http://127.0.0.1:8000",
    }
    model = load_file(ROOT / "gateway" / "kong.yml", environ, {"GATEWAY_IDENTITY_KEY": "k" * 32})
    return Router(model.routes)


def test_x_clinic_gateway_says_whether_the_gateway_routes_the_operation_here(document, gateway_router):
    """`x-clinic-gateway: false` exactly on the operations gateway/kong.yml does not send to this service
    (the e2e run fuzzes every other operation through the gateway)."""
    service, raw = document
    wrong = []
    for path, method, op in operations(raw):
        match = gateway_router.match(method.upper(), re.sub(r"{[^}]+}", "x1", path))
        routed_here = match is not None and match.route.service.name in KONG_SERVICES.get(service, {service})
        if op.get("x-clinic-gateway", True) != routed_here:
            wrong.append(f"{method.upper()} {path}: routed here {routed_here}")
    assert wrong == [], f"{service}: {wrong}"


def test_path_parameters_are_the_routes(document):
    """Every `{name}` of a path is a declared path parameter, and every path parameter is in the path."""
    service, raw = document
    for path, method, op in operations(raw):
        declared = [
            _resolve(raw, p["$ref"]) if "$ref" in p else p
            for p in [*raw["paths"][path].get("parameters", []), *op.get("parameters", [])]
        ]
        names = {p["name"] for p in declared if p["in"] == "path"}
        assert names == set(re.findall(r"{([^}]+)}", path)), f"{service} {method.upper()} {path}"
