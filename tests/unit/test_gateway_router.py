"""Kong's route matching and upstream path rules."""

from __future__ import annotations

import tracemalloc

import pytest

from services.gateway.model import Route, Service
from services.gateway.router import Router, normalize_path, strip_port, upstream_path


def service(path: str | None = None, enabled: bool = True) -> Service:
    return Service("s", "s", "http", "upstream", 80, path, 5, 60000, 60000, 60000, enabled)


def route(name: str, paths=(), methods=(), strip_path=True, svc=None, order=0) -> Route:
    return Route(name, name, svc or service(), ["http", "https"], list(methods), list(paths), strip_path, False, order)


def test_longest_prefix_wins_whatever_the_declaration_order():
    router = Router([route("short", ["/api"], order=0), route("long", ["/api/v1/messages"], order=1)])
    assert router.match("GET", "/api/v1/messages/7").route.name == "long"
    assert router.match("GET", "/api/v1/other").route.name == "short"


def test_prefix_match_is_a_plain_string_prefix_as_in_kong():
    router = Router([route("auth", ["/api/v1/auth"])])
    assert router.match("GET", "/api/v1/authority") is not None
    assert router.match("GET", "/api/v1/aut") is None


def test_more_conditions_beat_a_longer_path():
    router = Router([route("path-only", ["/api/v1/items"]), route("method-and-path", ["/api"], methods=["POST"])])
    assert router.match("POST", "/api/v1/items").route.name == "method-and-path"
    assert router.match("GET", "/api/v1/items").route.name == "path-only"


def test_disabled_services_are_not_routed():
    assert Router([route("off", ["/x"], svc=service(enabled=False))]).match("GET", "/x") is None


def test_strip_path_and_prefix():
    router = Router([route("r", ["/public"], svc=service("/internal"))])
    match = router.match("GET", "/public/a/b")
    assert (match.upstream_path, match.prefix) == ("/internal/a/b", "/public")
    keep = Router([route("r", ["/public"], strip_path=False, svc=service("/internal"))]).match("GET", "/public/a")
    assert (keep.upstream_path, keep.prefix) == ("/internal/public/a", None)


@pytest.mark.parametrize(
    ("base", "strip", "postfix", "req", "expected"),
    [
        ("/", True, "", "/s", "/"),
        ("/fee", True, "", "/s", "/fee"),
        ("/fee", True, "", "/s/", "/fee/"),
        ("/fee/", True, "", "/s", "/fee"),
        ("/fee/", True, "", "/s/", "/fee/"),
        ("/fee", True, "/x", "/s/x", "/fee/x"),
        ("/fee/", True, "/x", "/s/x", "/fee/x"),
        ("/fee", True, "x", "/sx", "/fee/x"),
        ("/", False, "", "/s/x", "/s/x"),
        ("/fee", False, "", "/s/x", "/fee/s/x"),
        ("/fee/", False, "", "/s/x", "/fee/s/x"),
        ("/fee", False, "", "/", "/fee"),
    ],
)
def test_upstream_path_v0_table(base, strip, postfix, req, expected):
    assert upstream_path(strip, postfix, req, base) == expected


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [("/a/%7Euser", "/a/~user"), ("/a/%2f", "/a/%2F"), ("/a/./b/../c", "/a/c"), ("/a//b", "/a/b"), ("/a/..", "/")],
)
def test_paths_are_normalized_before_matching(raw, normalized):
    assert normalize_path(raw) == normalized


def test_dot_segments_cannot_escape_a_prefix():
    router = Router([route("public", ["/public"]), route("admin", ["/admin"])])
    assert router.match("GET", "/public/../admin/x").route.name == "admin"


def test_matching_keeps_nothing_per_request_path():
    router = Router([route("api", ["/api"])])
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(300):
            assert router.match("GET", f"/api/{i}/" + "x" * 60_000) is not None
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert retained < 1_000_000  # 300 client paths of 60 kB each would be 18 MB


@pytest.mark.parametrize(
    ("host", "expected"),
    [("clinic.test", "clinic.test"), ("clinic.test:8000", "clinic.test"), ("[::1]:8000", "[::1]"),
     ("[::1]", "[::1]"), ("10.0.0.1:80", "10.0.0.1")],
)
def test_strip_port(host, expected):
    assert strip_port(host) == expected
