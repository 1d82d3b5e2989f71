"""The web service serves the published OpenAPI documents (docs/api.md): an index, and each
services/<service>/openapi.yaml exactly as in the repository; nothing else by that route."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import MagicMock

import pytest
import yaml

from services.web.http_api import build_app

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
