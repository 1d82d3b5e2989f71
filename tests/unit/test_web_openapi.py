"""The web service serves the published OpenAPI documents (docs/api.md): an index, and each
services/<service>/openapi.yaml exactly as in the repository; nothing else by that route."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import MagicMock

import jsonschema_rs
import pytest
import schemathesis
import yaml
from schemathesis.core.result import Err
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

from services.web.http_api import build_app
from services.web.openapi_merge import merge, prefix
from tests.unit.test_openapi_documents import DOCUMENTED, _refs, _resolve, _schemas, load, operations

ROOT = Path(__file__).resolve().parents[2]
FILES = {path.parent.name: path for path in (ROOT / "services").glob("*/openapi.yaml")}


@pytest.fixture
def client():
    return build_app(MagicMock(), MagicMock(), None, MagicMock()).test_client()


def test_the_index_lists_every_services_document(client):
    reply = client.get("/api/v1/openapi")
    assert reply.status_code == 200
    listed = reply.get_json()["documents"]
    assert [d["service"] for d in listed] == sorted(FILES)
    assert {d["url"] for d in listed} == {f"/api/v1/openapi/{name}.yaml" for name in FILES}
    assert {"directory", "web", "audit", "auto_reply", "erx_bridge"} <= set(FILES)


@pytest.mark.parametrize("service", sorted(FILES))
def test_each_document_is_served_as_it_is_in_the_repository(client, service):
    reply = client.get(f"/api/v1/openapi/{service}.yaml")
    assert reply.status_code == 200
    assert reply.headers["Content-Type"] == "application/yaml; charset=utf-8"
    assert reply.data == FILES[service].read_bytes()
    assert yaml.safe_load(reply.data)["openapi"] == "3.1.0"


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/openapi/nothing.yaml",
        "/api/v1/openapi/kit.yaml",  # a folder without a document
        "/api/v1/openapi/..%2Fdirectory%2Fopenapi.yaml",
        "/api/v1/openapi/directory.yml",
        "/api/v1/openapi/directory",
    ],
)
def test_anything_else_is_not_found(client, path):
    reply = client.get(path)
    assert reply.status_code == 404
    assert reply.get_json()["code"] == "not_found"


def test_the_documents_are_read_once_at_start(tmp_path):
    (tmp_path / "alpha").mkdir()
    (tmp_path / "alpha" / "openapi.yaml").write_text("openapi: 3.1.0\n")
    from services.web.http_api import published_documents

    documents = published_documents(tmp_path)
    (tmp_path / "alpha" / "openapi.yaml").write_text("changed\n")
    client = build_app(MagicMock(), MagicMock(), None, MagicMock(), documents=documents).test_client()
    assert client.get("/api/v1/openapi/alpha.yaml").data == b"openapi: 3.1.0\n"


# --- the merged document and its reference page ----------------------------------------------------


def gateway_operations(document: dict) -> Iterator[tuple[str, str, dict]]:
    """(path, method, operation) of every operation the gateway routes (`x-clinic-gateway` not false)."""
    for path, method, operation in operations(document):
        if operation.get("x-clinic-gateway", True) is not False:
            yield path, method, operation


@pytest.fixture(scope="module")
def merged() -> dict:
    reply = build_app(MagicMock(), MagicMock(), None, MagicMock()).test_client().get("/api/v1/openapi.json")
    assert reply.status_code == 200
    assert reply.headers["Content-Type"] == "application/json"
    return json.loads(reply.data)


def test_the_merged_document_is_valid_openapi_3_1(merged):
    assert merged["openapi"] == "3.1.0"
    errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in OPENAPI_31_VALIDATOR.iter_errors(merged)]
    assert errors == []
    invalid = []
    for where, schema in _schemas(merged):
        try:
            jsonschema_rs.meta.validate(schema)
        except jsonschema_rs.ValidationError as exc:
            invalid.append(f"{where}: {exc.message}")
    assert invalid == []
    for ref in _refs(merged):
        _resolve(merged, ref)
    schema = schemathesis.openapi.from_dict(merged)
    assert [str(r.err()) for r in schema.get_all_operations() if isinstance(r, Err)] == []


def test_the_merged_document_has_every_gateway_routed_operation_of_every_service(merged):
    expected = {}
    for service in DOCUMENTED:
        for path, method, operation in gateway_operations(load(service)):
            expected[(path, method)] = (service, operation["operationId"])
    found = {(path, method): (op["x-clinic-service"], op["operationId"]) for path, method, op in operations(merged)}
    assert found == expected
    assert len(expected) > 100  # every service's, not a few
    assert all(op.get("x-clinic-gateway", True) is True for _, _, op in operations(merged))


def test_component_names_carry_their_service_and_security_follows(merged):
    components = merged["components"]
    assert {"InboxError", "DirectoryError", "AutoReplyError", "WebError"} <= set(components["schemas"])
    assert "Error" not in components["schemas"]
    for kind, entries in components.items():
        for name in entries:
            assert name.startswith(tuple(prefix(s) for s in DOCUMENTED)), f"{kind}/{name}"
    schemes = set(components["securitySchemes"])
    for path, method, op in operations(merged):
        assert "security" in op, f"{method} {path}"
        service_prefix = prefix(op["x-clinic-service"])
        for requirement in op["security"]:
            assert set(requirement) <= schemes
            assert all(name.startswith(service_prefix) for name in requirement), f"{method} {path}"
        assert all(tag.startswith(f"{op['x-clinic-service']}/") for tag in op.get("tags", []))
    # A staff operation keeps its service's bearer requirement, a partner one its API key, a public one none.
    assert merged["paths"]["/api/v1/board"]["get"]["security"] == [{"InboxBearer": []}]
    portal = [op for path, _, op in operations(merged) if path.startswith("/api/v1/partner/portal/")]
    assert portal and all(op["security"] == [{"InboxApiKey": []}] for op in portal)
    assert merged["paths"]["/api/v1/openapi.json"]["get"]["security"] == []


def test_the_merged_document_follows_the_service_documents(tmp_path):
    """Built from what is served, so a change to a service's document shows at once; a path two
    services both claim is refused rather than one silently hiding the other."""
    one = (
        b"openapi: 3.1.0\ninfo: {title: a, version: '1'}\npaths:\n  /x:\n    get:\n      operationId: x\n"
        b"      responses: {'200': {description: ok}}\n"
    )
    assert merge({"alpha": one})["paths"]["/x"]["get"]["x-clinic-service"] == "alpha"
    with pytest.raises(ValueError, match="/x is documented by two services"):
        merge({"alpha": one, "beta": one})


def test_the_reference_page_lists_every_operation_without_script_or_style(merged):
    reply = build_app(MagicMock(), MagicMock(), None, MagicMock()).test_client().get("/api/v1/openapi/reference")
    assert reply.status_code == 200
    assert reply.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in reply.headers["Content-Security-Policy"]
    page = reply.get_data(as_text=True)
    # Nothing the page would load or run: no script, style, image, frame or handler; links stay on this origin.
    assert re.search(r"<(script|style|link|img|iframe|object)\b", page) is None
    assert re.search(r"\s(on[a-z]+|style|src)=", page) is None
    hrefs = set(re.findall(r'href="([^"]*)"', page))
    assert all(href == "/api/v1/openapi.json" or href.startswith("#service-") for href in hrefs), hrefs
    for path, method, operation in operations(merged):
        assert f'<section id="{html.escape(operation["operationId"])}">' in page, operation["operationId"]
        assert f"<code>{method.upper()} {html.escape(path)}</code>" in page
    for service in DOCUMENTED:
        assert f'<section id="service-{service}"><h2>{service}</h2>' in page
    # Parameters and responses, resolved from their components.
    assert "<caption>Parameters</caption>" in page and "<caption>Responses</caption>" in page
    assert "X-Correlation-ID" in page


def test_webs_document_lists_the_merged_routes():
    paths = load("web")["paths"]
    assert paths["/api/v1/openapi.json"]["get"]["operationId"] == "getMergedApiDocument"
    assert paths["/api/v1/openapi/reference"]["get"]["operationId"] == "getApiReference"
