"""Kong's shared field definitions (kong/db/schema/typedefs.lua) used by entities and plugins."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from services.gateway.declarative.schema import Array, Integer, Set, String

PROTOCOLS = ("grpc", "grpcs", "http", "https", "tcp", "tls", "tls_passthrough", "udp", "ws", "wss")
PROTOCOLS_HTTP = ("grpc", "grpcs", "http", "https")
HTTP_METHODS = ("GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "TRACE", "CONNECT")

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_NAME = re.compile(r"^[\w.\-~]+$")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")
_PATH_CHARS = re.compile(r"^[A-Za-z0-9\-._~%!$&'()*+,;=:@/]*$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")


def _uuid(value: str) -> str | None:
    return None if _UUID.match(value) else "expected a valid UUID"


def _name(value: str) -> str | None:
    if _NAME.match(value):
        return None
    return f"invalid value '{value}': it must only contain alphanumeric and '., -, _, ~' characters"


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return False
    return True


def _host(value: str) -> str | None:
    if is_ip(value) or _HOSTNAME.match(value):
        return None
    return f"invalid hostname: {value}"


def _path(value: str) -> str | None:
    if "//" in value:
        return "must not have empty segments"
    if not _PATH_CHARS.match(value) or re.search(r"%(?![0-9A-Fa-f]{2})", value):
        return f"invalid path: '{value}' (characters outside of the reserved list of RFC 3986 found)"
    return None


def _router_path(value: str) -> str | None:
    if not (value.startswith("/") or value.startswith("~/")):
        return "should start with: / (fixed path) or ~/ (regex path)"
    if value.startswith("~"):
        return None  # a regex path: refused as unsupported by the route's own check
    return _path(value)


def _tag(value: str) -> str | None:
    if "," in value or "/" in value:
        return "invalid tag: must not contain ',' or '/'"
    return None


def _header_name(value: str) -> str | None:
    if _HEADER_NAME.match(value):
        return None
    return f"bad header name '{value}', allowed characters are A-Z, a-z, 0-9, '_', and '-'"


def uuid(**kw: Any) -> String:
    return String(custom=_uuid, **kw)


def name(**kw: Any) -> String:
    return String(custom=_name, **kw)


def host(**kw: Any) -> String:
    return String(custom=_host, **kw)


def port(**kw: Any) -> Integer:
    return Integer(between=(0, 65535), **kw)


def path(**kw: Any) -> String:
    return String(starts_with="/", custom=_path, **kw)


def header_name(**kw: Any) -> String:
    return String(custom=_header_name, **kw)


def tags() -> Array:
    return Set(elements=String(custom=_tag))


def timestamp() -> Integer:
    return Integer(between=(0, 2**53))


def timeout(default: int) -> Integer:
    return Integer(between=(1, 2**31 - 2), default=default)


def protocol(**kw: Any) -> String:
    return String(one_of=PROTOCOLS, **kw)


def protocols(allowed: tuple[str, ...], default: tuple[str, ...]) -> Array:
    return Set(elements=String(one_of=allowed), default=list(default), required=True)


def methods() -> Array:
    return Set(elements=String(match=r"^[A-Z]+$"))


def router_paths() -> Array:
    return Array(elements=String(custom=_router_path))
