"""The page's static files: bytes a browser downloads on a first visit and on a returning visit
after one module changed, as web serves them (hashed names cached for a year, gzip) against
serving every file plain and uncached (each visit downloads everything).

    python -m bench.bench_static [--module js/dom.js]

The browser is modelled: it loads `/`, the files the page names and every module the import map
resolves, keeps what a `Cache-Control: public, max-age=…, immutable` answer gave it and asks
again only for addresses it does not hold. The change is a comment appended to one module in a
copy of the static folder, served by a new app (as after a deploy). Bytes are bodies as sent
(after gzip); headers are not counted.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

from bench._env import machine, write_report
from services.web import config
from services.web.assets import IMMUTABLE, Assets
from services.web.http_api import STATIC_DIR, build_app
from services.web.live import Hub
from services.web.sessions import DirectorySessions

REFERENCE = re.compile(r'(?:src|href)="(/static/[^"]+)"')
IMPORT = re.compile(r'(?:from|import)\s*"(\./[^"]+)"')
IMPORT_MAP = re.compile(r'<script type="importmap">(.*?)</script>', re.S)


def client_for(root: Path):
    settings = config.load({"WEB_ALLOWED_ORIGINS": "http://127.0.0.1:8000", "CLINIC_RUN_DIR": "/tmp"})
    sessions = DirectorySessions("http://127.0.0.1:9", settings.refresh_cookie_max_age_s)
    return build_app(sessions, Hub(4, 2), None, settings, assets=Assets(root)).test_client()


class Browser:
    """A browser's HTTP cache, as far as these answers need: immutable answers are kept by URL."""

    def __init__(self, accept_encoding: str) -> None:
        self.accept_encoding = accept_encoding
        self.held: dict[str, bytes] = {}

    def visit(self, client) -> dict:
        sent = {"bytes": 0, "requests": 0, "from_cache": 0}

        def get(url: str) -> bytes:
            if url in self.held:
                sent["from_cache"] += 1
                return self.held[url]
            response = client.get(url, headers={"Accept-Encoding": self.accept_encoding})
            assert response.status_code == 200, (url, response.status_code)
            sent["bytes"] += len(response.data)
            sent["requests"] += 1
            body = response.data
            if response.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if response.headers.get("Cache-Control") == IMMUTABLE:
                self.held[url] = body
            return body

        html = get("/").decode()
        found = IMPORT_MAP.search(html)
        mapping = json.loads(found.group(1))["imports"] if found else {}
        pending = REFERENCE.findall(html)
        seen: set[str] = set()
        while pending:
            url = pending.pop()
            if url in seen:
                continue
            seen.add(url)
            body = get(url)
            if url.endswith(".js"):
                folder = url.rsplit("/", 1)[0]
                for target in IMPORT.findall(body.decode()):
                    plain = f"{folder}/{target.removeprefix('./')}"
                    pending.append(mapping.get(plain, plain))
        return sent


def plain_visit(root: Path) -> dict:
    """Every file as it is, uncached: what the page cost before (each visit the same)."""
    page = (root / "index.html").read_bytes()
    files = [page] + [path.read_bytes() for path in root.rglob("*") if path.suffix in (".js", ".css")]
    return {"bytes": sum(len(body) for body in files), "requests": len(files), "from_cache": 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", default="js/dom.js", help="the module changed between the visits")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "static"
        shutil.copytree(STATIC_DIR, root)
        before = client_for(root)
        browser = Browser("gzip, deflate, br")
        first = browser.visit(before)
        unchanged = browser.visit(before)
        changed = root / args.module
        changed.write_text(changed.read_text() + "\n// changed for bench_static\n")
        after = client_for(root)
        returning = browser.visit(after)
        identity_first = Browser("identity").visit(before)
        uncached = plain_visit(root)
    report = {
        "machine": machine(),
        "changed_module": args.module,
        "uncached_plain_every_visit": uncached,
        "first_visit_identity": identity_first,
        "first_visit_gzip": first,
        "returning_visit_unchanged": unchanged,
        "returning_visit_one_module_changed": returning,
        "ratios": {
            "gzip_first_vs_plain": round(first["bytes"] / uncached["bytes"], 3),
            "returning_changed_vs_first_gzip": round(returning["bytes"] / first["bytes"], 3),
            "returning_changed_vs_plain": round(returning["bytes"] / uncached["bytes"], 3),
        },
    }
    path = write_report("bench_static", report)
    for name in (
        "uncached_plain_every_visit",
        "first_visit_identity",
        "first_visit_gzip",
        "returning_visit_unchanged",
        "returning_visit_one_module_changed",
    ):
        figures = report[name]
        print(
            f"{name:40s} {figures['bytes']:>8,} bytes  {figures['requests']:>3} requests"
            f"  {figures['from_cache']:>3} from cache"
        )
    print("ratios:", report["ratios"])
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
