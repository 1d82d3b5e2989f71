"""What the Direct message code shares: stable ids from their parts, times as ISO-8601 UTC, and an
attachment served safely
(its declared type unless a browser could run it, then `application/octet-stream`; always a
download, `nosniff`, `no-store`)."""

from __future__ import annotations

import datetime as dt
import hashlib
import re

from flask import Response

# Attachment types served as-is; anything a browser could run is served as octet-stream.
ACTIVE_TYPES = {"text/html", "application/xhtml+xml", "image/svg+xml", "text/javascript", "application/javascript"}


def digest(*parts: str) -> str:
    """A stable 32-hex-digit id of `parts` (the parts joined by a unit separator, SHA-256)."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def attachment_response(data: bytes, filename: str, content_type: str) -> Response:
    ctype = content_type if re.fullmatch(r"[a-z0-9.+-]+/[a-z0-9.+-]+", content_type) else ""
    if not ctype or ctype in ACTIVE_TYPES:
        ctype = "application/octet-stream"
    safe_name = re.sub(r"[^A-Za-z0-9._-]", "_", filename)[:128] or "attachment"
    return Response(
        data,
        mimetype=ctype,
        headers={
            "Content-Disposition": f'attachment; filename="{safe_name}"',
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-store",
        },
    )
