"""The page's static files as the browser gets them: each also under a name carrying a hash of its
content (`js/app.3f9c0a1b2c4d5e6f.js`), which a browser may keep for a year without asking again,
since changed content gets a new name; compressed with gzip when the browser takes it; with an ETag
so a plain name (`js/app.js`, kept for pages loaded before a change) is revalidated with a 304.

The modules import each other by relative path (`./dom.js`) and are served unchanged: the page
carries an import map from every module's plain address to its hashed one, so a changed module
changes only its own address, and a returning browser fetches only that file (and the page).
The import map is an inline script, allowed by its hash in the page's Content-Security-Policy.

Everything is read, hashed and compressed once, at start: a changed file is served after a restart.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import mimetypes
import re
from dataclasses import dataclass
from pathlib import Path

from flask import Request, Response

URL_PREFIX = "/static/"
PAGE = "index.html"
HASH_HEX_DIGITS = 16
# A hashed name never changes content, so a browser need not ask again.
IMMUTABLE = "public, max-age=31536000, immutable"
# A plain name may change content at the next start: the browser revalidates (ETag, 304) each time.
REVALIDATE = "no-cache"
COMPRESSIBLE_TYPES = ("text/", "application/json", "image/svg+xml")
# Below this, gzip's header and the Content-Encoding line cost about what they save.
MIN_COMPRESS_BYTES = 256
CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
}
# `src="/static/…"` and `href="/static/…"` in the page.
PAGE_REFERENCE = re.compile(r'(?P<attr>\b(?:src|href))="/static/(?P<path>[^"?#]+)"')
FIRST_SCRIPT = re.compile(r"<script\b")


@dataclass(frozen=True)
class Asset:
    """One file below the static folder: `path` its plain name there (`js/app.js`), `hashed` its
    name with the content hash (`js/app.<hash>.js`)."""

    path: str
    hashed: str
    digest: str
    content_type: str
    body: bytes
    gzipped: bytes | None  # None: not worth compressing

    def etag(self, encoding: str | None) -> str:
        """One tag per representation (RFC 9110 8.8.3): the compressed bytes are not the plain ones."""
        return self.digest if encoding is None else f"{self.digest}-{encoding}"


@dataclass(frozen=True)
class Page:
    """The page as served: references to assets rewritten to hashed names, the import map inserted,
    and the hash source (`'sha256-…'`) the Content-Security-Policy must allow for that map."""

    body: bytes
    gzipped: bytes
    script_hash: str


def content_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:HASH_HEX_DIGITS]


def hashed_name(path: str, digest: str) -> str:
    """`js/app.js` -> `js/app.<digest>.js`; a name without an extension gets `.<digest>` appended."""
    folder, _, name = path.rpartition("/")
    stem, dot, extension = name.rpartition(".")
    named = f"{stem}.{digest}.{extension}" if dot and stem else f"{name}.{digest}"
    return f"{folder}/{named}" if folder else named


def content_type(path: str) -> str:
    suffix = Path(path).suffix.lower()
    return CONTENT_TYPES.get(suffix) or mimetypes.guess_type(path)[0] or "application/octet-stream"


def compress(body: bytes, kind: str) -> bytes | None:
    if len(body) < MIN_COMPRESS_BYTES or not kind.startswith(COMPRESSIBLE_TYPES):
        return None
    packed = gzip.compress(body, compresslevel=9, mtime=0)  # mtime 0: the same bytes every start
    return packed if len(packed) < len(body) else None


def load_asset(root: Path, file: Path) -> Asset:
    path = file.relative_to(root).as_posix()
    body = file.read_bytes()
    digest = content_digest(body)
    kind = content_type(path)
    return Asset(path, hashed_name(path, digest), digest, kind, body, compress(body, kind))


class Assets:
    """Every file below `root`, by its plain and its hashed name, and the page built on them."""

    def __init__(self, root: Path, page: str = PAGE) -> None:
        files = sorted(file for file in root.rglob("*") if file.is_file() and not file.name.startswith("."))
        self.by_path: dict[str, Asset] = {}
        self.by_hashed: dict[str, Asset] = {}
        for file in files:
            asset = load_asset(root, file)
            self.by_path[asset.path] = asset
            self.by_hashed[asset.hashed] = asset
        self.page = self.build_page((root / page).read_text(encoding="utf-8"))

    def find(self, name: str) -> tuple[Asset, bool] | None:
        """The asset a request names, and whether it was named by its hash."""
        if name in self.by_hashed:
            return self.by_hashed[name], True
        if name in self.by_path:
            return self.by_path[name], False
        return None

    def url(self, path: str) -> str:
        return URL_PREFIX + self.by_path[path].hashed

    def import_map(self) -> dict:
        """Every module's plain address -> its hashed one. A relative import resolves to the plain
        address first (`./dom.js` from `/static/js/app.<hash>.js` is `/static/js/dom.js`), which
        the map then sends to the current file."""
        modules = {URL_PREFIX + path: self.url(path) for path in self.by_path if path.endswith(".js")}
        return {"imports": dict(sorted(modules.items()))}

    def build_page(self, html: str) -> Page:
        def hashed(match: re.Match) -> str:
            path = match["path"]
            if path not in self.by_path:
                return match[0]
            return f'{match["attr"]}="{self.url(path)}"'

        html = PAGE_REFERENCE.sub(hashed, html)
        script = json.dumps(self.import_map(), separators=(",", ":"))
        element = f'<script type="importmap">{script}</script>\n  '
        # The map must come before the first module script (or it is ignored).
        first = FIRST_SCRIPT.search(html)
        at = first.start() if first else html.index("</head>")
        html = html[:at] + element + html[at:]
        script_hash = "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        body = html.encode("utf-8")
        return Page(body, gzip.compress(body, compresslevel=9, mtime=0), script_hash)

    def page_policy(self, policy: str) -> str:
        """`policy` (a Content-Security-Policy) allowing this page's import map and no other inline script."""
        return policy.replace("script-src 'self'", f"script-src 'self' {self.page.script_hash}", 1)


def accepts_gzip(request: Request) -> bool:
    return request.accept_encodings["gzip"] > 0


def encoded(response: Response, body: bytes, gzipped: bytes | None, request: Request) -> str | None:
    """Set `response`'s body to the plain or the gzip bytes, as the request accepts; says which encoding."""
    response.headers["Vary"] = "Accept-Encoding"
    if gzipped is not None and accepts_gzip(request):
        response.set_data(gzipped)
        response.headers["Content-Encoding"] = "gzip"
        return "gzip"
    response.set_data(body)
    return None


def page_response(assets: Assets, request: Request) -> Response:
    response = Response(content_type=CONTENT_TYPES[".html"])
    encoded(response, assets.page.body, assets.page.gzipped, request)
    return response


def asset_response(asset: Asset, by_hash: bool, request: Request) -> tuple[Response, str]:
    """The asset (or 304 when the browser holds it already) and the Cache-Control it must carry."""
    cache_control = IMMUTABLE if by_hash else REVALIDATE
    encoding = "gzip" if asset.gzipped is not None and accepts_gzip(request) else None
    etag = asset.etag(encoding)
    # Either representation's tag shows the browser holds this content (a hop may have decoded it).
    held = any(request.if_none_match.contains_weak(asset.etag(each)) for each in (None, "gzip"))
    if held:
        response = Response(status=304)
        response.headers["Vary"] = "Accept-Encoding"
    else:
        response = Response(content_type=asset.content_type)
        encoded(response, asset.body, asset.gzipped, request)
    response.set_etag(etag)
    return response, cache_control
