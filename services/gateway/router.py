"""Kong's router for plain-path HTTP routes (router_flavor traditional_compatible, the 3.x default).

Each (route, path) pair is a candidate ranked as Kong ranks them: first by how
many kinds of condition the route sets (methods, paths), then by the length of
the path prefix, then by declaration order. The first candidate whose conditions all
hold wins. A path condition is a plain string prefix of the normalized
request path, so `/api/v1/auth` also matches `/api/v1/authx`, exactly as in Kong.
Nothing is cached per request path: with a handful of routes the scan is cheap,
and a cache keyed by what clients send would grow with what clients send.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.gateway.model import Route

_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def normalize_path(path: str) -> str:
    """kong.tools.uri.normalize: decode unreserved escapes, upper-case the rest, drop dot segments, merge slashes."""
    if "%" in path:
        def fix(m: re.Match) -> str:
            char = chr(int(m.group(1), 16))
            return char if char in _UNRESERVED else "%" + m.group(1).upper()

        path = _PERCENT.sub(fix, path)
    if "//" in path:
        path = re.sub(r"/{2,}", "/", path)
    if "/." in path:
        path = _remove_dot_segments(path)
    return path


def _remove_dot_segments(path: str) -> str:
    output: list[str] = []
    segments = path.split("/")
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
            continue
        if segment == "..":
            if len(output) > 1:
                output.pop()
            if last:
                output.append("")
            continue
        output.append(segment)
    result = "/".join(output)
    return result if result.startswith("/") else "/" + result


def strip_port(host: str) -> str:
    """A Host header without its port: `[::1]:8000` -> `[::1]`, `example.test:8000` -> `example.test`."""
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.split(":", 1)[0]


def sanitize_postfix(postfix: str) -> str:
    if postfix in (".", ".."):
        return ""
    if postfix.startswith("./"):
        return postfix[2:]
    if postfix.startswith("../"):
        return postfix[3:]
    return postfix


def upstream_path(strip_path: bool, postfix: str, req_path: str, base: str) -> str:
    """kong/router/utils.lua get_upstream_uri_v0, the path Kong sends upstream."""
    if base.endswith("/"):
        if strip_path:
            if postfix == "":
                if base == "/":
                    return "/"
                return base if req_path.endswith("/") else base[:-1]
            if postfix.startswith("/"):
                return base[:-1] + postfix
            return base + postfix
        return base + req_path[1:]
    if strip_path:
        if postfix == "":
            return base + "/" if len(req_path) > 1 and req_path.endswith("/") else base
        if postfix.startswith("/"):
            return base + postfix
        return base + "/" + postfix
    return base if req_path == "/" else base + req_path


@dataclass(frozen=True)
class Match:
    route: Route
    upstream_path: str
    prefix: str | None  # what strip_path removed, for X-Forwarded-Prefix


@dataclass(frozen=True)
class _Candidate:
    route: Route
    path: str | None
    methods: frozenset[str]


class Router:
    def __init__(self, routes: list[Route]):
        ranked: list[tuple[tuple, _Candidate]] = []
        for route in routes:
            if not route.service.enabled:
                continue  # Kong 3.x does not route to a disabled service
            weight = bool(route.methods) + bool(route.paths)
            for path in route.paths or [None]:
                candidate = _Candidate(route=route, path=path, methods=frozenset(route.methods))
                ranked.append(((-weight, -len(path or ""), route.order), candidate))
        ranked.sort(key=lambda item: item[0])
        self._candidates = [c for _, c in ranked]

    def match(self, method: str, raw_path: str) -> Match | None:
        path = normalize_path(raw_path)
        for c in self._candidates:
            if c.methods and method not in c.methods:
                continue
            if c.path is not None and not path.startswith(c.path):
                continue
            route = c.route
            base = route.service.path or "/"
            if route.strip_path and c.path is not None:
                postfix = sanitize_postfix(path[len(c.path):])
                prefix = c.path if c.path != "/" else None
            else:
                postfix = sanitize_postfix(path[1:])
                prefix = None
            return Match(route, upstream_path(route.strip_path, postfix, path, base), prefix)
        return None
