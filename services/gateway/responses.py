"""Responses the gateway produces itself, byte for byte in Kong 3.9's shapes.

Kong has two ways to answer on its own:
- `kong.response.error(status, message)` (router 404, key-auth, acl,
  rate-limiting, request-size-limiting, upstream 502/504): a templated body
  chosen by the request's Accept header, always carrying `request_id`;
- `kong.response.exit(status, table)` (the jwt plugin): the table encoded as
  compact JSON, without `request_id`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from http import HTTPStatus

KONG_VERSION = "3.9.1"
SERVER = f"kong/{KONG_VERSION}"
VIA = f"1.1 {SERVER}"

JSON = "application/json; charset=utf-8"
HTML = "text/html; charset=utf-8"
XML = "application/xml; charset=utf-8"
PLAIN = "text/plain; charset=utf-8"

# kong/error_handlers.lua and kong/tools/http.lua: the default message of each status the gateway answers
# without a message of its own. 494 is nginx's internal status for an oversized request head, which Kong's
# error handler answers as a 400.
DEFAULT_MESSAGES = {
    400: "Bad request",
    401: "Unauthorized",
    414: "URI too long",
    494: "Request header or cookie too large",
    500: "An unexpected error occurred",
    502: "An invalid response was received from the upstream server",
    503: "The upstream server is currently unavailable",
    504: "The upstream server is timing out",
}

_TEMPLATES = {
    JSON: '{\n  "message":"%s",\n  "request_id":"%s"\n}',
    HTML: (
        '<!doctype html>\n<html>\n  <head>\n    <meta charset="utf-8">\n    <title>Error</title>\n  </head>\n'
        "  <body>\n    <h1>Error</h1>\n    <p>%s.</p>\n    <p>request_id: %s</p>\n  </body>\n</html>\n"
    ),
    XML: (
        '<?xml version="1.0" encoding="UTF-8"?>\n<error>\n  <message>%s</message>\n'
        "  <requestid>%s</requestid>\n</error>\n"
    ),
    PLAIN: "%s\nrequest_id: %s\n",
}

_MEDIA_TYPES = {
    "application/json": JSON,
    "application/*": JSON,
    "*/*": JSON,
    "text/html": HTML,
    "application/xml": XML,
    "text/xml": XML,
    "text/plain": PLAIN,
    "text/*": PLAIN,
}
_ACCEPT = re.compile(
    r"^\s*((?:[a-z0-9][a-z0-9\-!#$&^_+.]*|\*)/(?:[a-z0-9][a-z0-9\-!#$&^_+.]*|\*))(?:\s*;\s*q=(\d(?:\.\d{0,3})?))?",
    re.IGNORECASE,
)


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def response_type(accept: str | None) -> str:
    """Kong's choice of error format: the acceptable media type with the highest q, JSON by default."""
    content_type = JSON
    if not accept:
        return content_type
    best = 0.0
    for part in accept.split(","):
        m = _ACCEPT.match(part)
        if not m:
            continue
        q = float(m.group(2)) if m.group(2) else 1.0
        if q > best:
            best = q
            content_type = _MEDIA_TYPES.get(m.group(1).lower(), content_type)
    return content_type


def _escape(message: str, content_type: str) -> str:
    if content_type == JSON:
        return json.dumps(message)[1:-1]
    if content_type in (HTML, XML):
        return message.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return message


@dataclass
class Exit:
    """A response the gateway sends without calling the upstream."""

    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)


def error(status: int, request_id: str, accept: str | None = None, message: str | None = None,
          headers: list[tuple[str, str]] | None = None) -> Exit:
    """`kong.response.error`: the templated body with the request id."""
    content_type = response_type(accept)
    if message is None:
        message = DEFAULT_MESSAGES.get(status, f"The upstream server responded with {status}")
    body = (_TEMPLATES[content_type] % (_escape(message, content_type), request_id)).encode()
    return Exit(status, body, [*(headers or []), ("Content-Type", content_type)])


def exit_json(status: int, payload: dict, headers: list[tuple[str, str]] | None = None) -> Exit:
    """`kong.response.exit` with a table body: compact JSON, no request id."""
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return Exit(status, body, [*(headers or []), ("Content-Type", JSON)])
