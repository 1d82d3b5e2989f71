"""The page's static files: hashed names cached for a year, plain names revalidated, gzip when
accepted, ETag and 304, the import map that sends every module import to its hashed file, and
no-store kept on the page and the API (services/web/assets.py)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from services.web import config
from services.web.assets import IMMUTABLE, REVALIDATE, Assets, content_digest, hashed_name
from services.web.http_api import STATIC_DIR, build_app
from services.web.live import Hub
from services.web.sessions import DirectorySessions

ORIGIN = "http://127.0.0.1:8000"
IMPORT_MAP = re.compile(r'<script type="importmap">(?P<map>.*?)</script>', re.S)


def app_for(assets: Assets | None = None):
    settings = config.load({"WEB_ALLOWED_ORIGINS": ORIGIN, "CLINIC_RUN_DIR": "/tmp"})
    sessions = DirectorySessions("http://127.0.0.1:9", settings.refresh_cookie_max_age_s)
    return build_app(sessions, Hub(4, 2), verifier=None, settings=settings, assets=assets)


@pytest.fixture
def client():
    return app_for().test_client()


@pytest.fixture
def static_copy(tmp_path) -> Path:
    root = tmp_path / "static"
    shutil.copytree(STATIC_DIR, root)
    return root


def page_of(client) -> str:
    response = client.get("/", headers={"Accept-Encoding": "identity"})
    assert response.status_code == 200 and "Content-Encoding" not in response.headers
    return response.get_data(as_text=True)


def import_map(html: str) -> dict[str, str]:
    return json.loads(IMPORT_MAP.search(html)["map"])["imports"]


def test_a_hashed_name_carries_the_content_hash():
    assert hashed_name("js/app.js", "0123456789abcdef") == "js/app.0123456789abcdef.js"
    assert hashed_name("app.css", "0123456789abcdef") == "app.0123456789abcdef.css"
    assert hashed_name("LICENSE", "0123456789abcdef") == "LICENSE.0123456789abcdef"
    assert content_digest(b"a") != content_digest(b"b") and len(content_digest(b"a")) == 16


def test_changing_one_module_changes_only_its_own_hashed_name(static_copy):
    before = Assets(static_copy)
    dom = static_copy / "js" / "dom.js"
    dom.write_text(dom.read_text() + "\n// changed\n")
    after = Assets(static_copy)
    changed = {path for path in before.by_path if before.url(path) != after.url(path)}
    assert changed == {"js/dom.js"}
    assert after.url("js/dom.js") == "/static/" + hashed_name("js/dom.js", content_digest(dom.read_bytes()))
    # Its importers are served unchanged: the page's import map sends `./dom.js` to the new file.
    assert import_map(after.page.body.decode())["/static/js/dom.js"] == after.url("js/dom.js")
    assert before.page.body != after.page.body


def test_the_page_names_every_asset_by_its_hash_and_maps_every_module(client):
    html = page_of(client)
    assets: Assets = client.application.extensions["web"]["assets"]
    assert f'<link rel="stylesheet" href="{assets.url("app.css")}">' in html
    assert f'<script type="module" src="{assets.url("js/app.js")}"></script>' in html
    assert 'href="/static/app.css"' not in html and 'src="/static/js/app.js"' not in html
    modules = sorted(path.name for path in (STATIC_DIR / "js").glob("*.js"))
    mapping = import_map(html)
    assert sorted(mapping) == [f"/static/js/{name}" for name in modules]
    for plain, hashed in mapping.items():
        name = plain.removeprefix("/static/js/")
        digest = content_digest((STATIC_DIR / "js" / name).read_bytes())
        assert hashed == f"/static/js/{name.removesuffix('.js')}.{digest}.js"
        assert client.get(hashed).data == (STATIC_DIR / "js" / name).read_bytes()
    # The map comes before the first module script, or the browser ignores it.
    assert html.index('type="importmap"') < html.index('type="module"')


def test_every_relative_import_resolves_to_a_mapped_module():
    """A module imported by a path the map does not name would load from its plain (revalidated)
    address instead, and could be a different version from its hashed importers."""
    imported = set()
    for script in (STATIC_DIR / "js").glob("*.js"):
        for target in re.findall(r'(?:from|import)\s*\(?\s*"(\./[^"]+)"', script.read_text()):
            imported.add("/static/js/" + target.removeprefix("./"))
    mapping = import_map(Assets(STATIC_DIR).page.body.decode())
    assert imported and imported <= set(mapping)


def test_the_import_map_is_allowed_by_its_hash_and_no_other_inline_script(client):
    response = client.get("/")
    html = response.get_data(as_text=True) if "Content-Encoding" not in response.headers else page_of(client)
    script = IMPORT_MAP.search(html)["map"]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = response.headers["Content-Security-Policy"]
    assert f"script-src 'self' 'sha256-{digest}';" in csp
    assert "unsafe-inline" not in csp and "style-src 'self';" in csp
    # Assets keep the page's policy without the hash (they are not pages).
    assert "sha256-" not in client.get("/static/app.css").headers["Content-Security-Policy"]


def test_hashed_assets_are_immutable_and_plain_ones_revalidate(client):
    assets: Assets = client.application.extensions["web"]["assets"]
    hashed = client.get(assets.url("js/api.js"))
    assert hashed.status_code == 200 and hashed.headers["Cache-Control"] == IMMUTABLE
    assert IMMUTABLE == "public, max-age=31536000, immutable"
    plain = client.get("/static/js/api.js")
    assert plain.status_code == 200 and plain.headers["Cache-Control"] == REVALIDATE == "no-cache"
    assert plain.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert plain.data == (STATIC_DIR / "js" / "api.js").read_bytes()
    assert plain.headers["ETag"] == f'"{content_digest(plain.data)}"'


def test_the_page_and_the_api_stay_no_store(client):
    assert client.get("/").headers["Cache-Control"] == "no-store"
    assert client.get("/api/v1/openapi").headers["Cache-Control"] == "no-store"
    assert client.post("/app/session", json={}).headers["Cache-Control"] == "no-store"  # refused: csrf
    missing = client.get("/static/js/no-such.0123456789abcdef.js")
    assert missing.status_code == 404 and missing.get_json()["code"] == "not_found"
    assert missing.headers["Cache-Control"] == "no-store"
    assert client.get("/static/../http_api.py").status_code == 404


@pytest.mark.parametrize("path", ["/", "/static/js/app.js", "/static/app.css"])
def test_gzip_round_trips_when_accepted_and_never_otherwise(client, path):
    plain = client.get(path, headers={"Accept-Encoding": "identity"})
    packed = client.get(path, headers={"Accept-Encoding": "br;q=1, gzip;q=0.5"})
    refused = client.get(path, headers={"Accept-Encoding": "gzip;q=0"})
    assert packed.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(packed.data) == plain.data
    assert len(packed.data) < len(plain.data)
    assert int(packed.headers["Content-Length"]) == len(packed.data)
    assert "Content-Encoding" not in plain.headers and "Content-Encoding" not in refused.headers
    for response in (plain, packed, refused):
        assert response.headers["Vary"] == "Accept-Encoding"
    if path != "/":
        assert packed.headers["ETag"] != plain.headers["ETag"]  # one tag per representation


def test_a_small_file_is_sent_as_it_is(static_copy):
    (static_copy / "tiny.css").write_text("body{margin:0}\n")
    client = app_for(Assets(static_copy)).test_client()
    response = client.get("/static/tiny.css", headers={"Accept-Encoding": "gzip"})
    assert response.data == b"body{margin:0}\n" and "Content-Encoding" not in response.headers


@pytest.mark.parametrize("encoding", ["gzip", "identity"])
def test_a_held_asset_is_answered_304_by_its_etag(client, encoding):
    assets: Assets = client.application.extensions["web"]["assets"]
    for url in ("/static/js/dom.js", assets.url("js/dom.js")):
        first = client.get(url, headers={"Accept-Encoding": encoding})
        again = client.get(url, headers={"Accept-Encoding": encoding, "If-None-Match": first.headers["ETag"]})
        assert again.status_code == 304 and again.data == b""
        assert again.headers["ETag"] == first.headers["ETag"]
        assert again.headers["Cache-Control"] == first.headers["Cache-Control"]
        stale = client.get(url, headers={"Accept-Encoding": encoding, "If-None-Match": '"0000000000000000"'})
        assert stale.status_code == 200 and stale.data == first.data


def test_a_plain_name_is_revalidated_to_the_new_content_after_a_change(static_copy):
    old = app_for(Assets(static_copy)).test_client().get("/static/js/dom.js")
    dom = static_copy / "js" / "dom.js"
    dom.write_text(dom.read_text() + "\n// changed\n")
    client = app_for(Assets(static_copy)).test_client()
    fresh = client.get("/static/js/dom.js", headers={"If-None-Match": old.headers["ETag"]})
    assert fresh.status_code == 200 and fresh.data == dom.read_bytes()
    # The old hashed name is gone: an old page revalidates through its plain names instead.
    assert client.get(f"/static/js/dom.{content_digest(old.data)}.js").status_code == 404
