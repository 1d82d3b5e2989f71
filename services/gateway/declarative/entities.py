"""Kong 3.9 core entities as they appear in a decK file: services, routes, consumers, credentials.

Field lists, defaults and constraints follow kong/db/schema/entities/*.lua and
the credential daos of the jwt, key-auth and acl plugins. `local=` marks the
values Kong accepts that the local gateway cannot reproduce.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from services.gateway.declarative import typedefs as t
from services.gateway.declarative.schema import (
    MISSING,
    Array,
    Boolean,
    Field,
    Integer,
    Map,
    Problems,
    Record,
    Set,
    String,
    at_least_one_of,
    join,
)

JWT_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512",
                  "PS256", "PS384", "PS512", "EdDSA")


def _non_empty(what: str):
    def check(value: Any) -> str | None:
        return f"{what} cannot be matched by the local gateway" if value else None

    return check


def _only(allowed: tuple, what: str):
    def check(value: Any) -> str | None:
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if v not in allowed]
        return f"{what} {', '.join(map(str, bad))} (supported: {', '.join(allowed)})" if bad else None

    return check


def _route_must_match_something(record: dict, path: str, problems: Problems) -> None:
    protocols = record.get("protocols") or []
    if not {"http", "https"} & set(protocols):
        return
    keys = ["methods", "hosts", "headers", "paths"] + (["snis"] if "https" in protocols else [])
    if all(not record.get(k) for k in keys):
        scheme = "https" if "https" in protocols else "http"
        problems.add(path, f"must set one of {', '.join(repr(k) for k in keys)} when 'protocols' is '{scheme}'")


def _no_regex_paths(paths: list[str]) -> str | None:
    regex = [p for p in paths if p.startswith("~")]
    return f"regex paths ({', '.join(regex)})" if regex else None


def _service_tls_fields(record: dict, path: str, problems: Problems) -> None:
    if record.get("protocol") != "https":
        for name in ("client_certificate", "tls_verify", "tls_verify_depth", "ca_certificates"):
            if record.get(name) not in (None, []):
                problems.add(join(path, name), f"value must be null when 'protocol' is '{record.get('protocol')}'")


FOREIGN = Field()  # a reference by name or id; resolved when the model is built

SOURCE = Record(fields={"ip": String(), "port": t.port()})

SERVICE = Record(
    fields={
        "id": t.uuid(),
        "created_at": t.timestamp(),
        "updated_at": t.timestamp(),
        "name": t.name(),
        "retries": Integer(default=5, between=(0, 32767)),
        "protocol": t.protocol(required=True, default="http", local=_only(("http",), "protocol")),
        "host": t.host(required=True),
        "port": t.port(required=True, default=80),
        "path": t.path(),
        "connect_timeout": t.timeout(60000),
        "write_timeout": t.timeout(60000),
        "read_timeout": t.timeout(60000),
        "tags": t.tags(),
        "client_certificate": FOREIGN,
        "tls_verify": Boolean(),
        "tls_verify_depth": Integer(between=(0, 64)),
        "ca_certificates": Array(elements=t.uuid()),
        "enabled": Boolean(required=True, default=True),
    },
    checks=(_service_tls_fields,),
    passthrough=frozenset({"routes", "plugins"}),
)

ROUTE = Record(
    fields={
        "id": t.uuid(),
        "created_at": t.timestamp(),
        "updated_at": t.timestamp(),
        "name": t.name(),
        "protocols": t.protocols(t.PROTOCOLS, ("http", "https")),
        "methods": t.methods(),
        "hosts": Array(elements=String(), local=_non_empty("hosts")),
        "paths": Array(elements=t.router_paths().elements, local=_no_regex_paths),
        "headers": Map(keys=String(), values=Array(elements=String()), local=_non_empty("headers")),
        "https_redirect_status_code": Integer(one_of=(426, 301, 302, 307, 308), default=426, required=True),
        "regex_priority": Integer(default=0),
        "strip_path": Boolean(default=True),
        "path_handling": String(default="v0", one_of=("v0", "v1"), local=_only(("v0",), "path_handling")),
        "preserve_host": Boolean(default=False),
        "request_buffering": Boolean(required=True, default=True),
        "response_buffering": Boolean(required=True, default=True),
        "snis": Set(elements=String(), local=_non_empty("snis")),
        "sources": Set(elements=SOURCE, local=_non_empty("sources")),
        "destinations": Set(elements=SOURCE, local=_non_empty("destinations")),
        "tags": t.tags(),
        "service": FOREIGN,
    },
    checks=(_route_must_match_something,),
    passthrough=frozenset({"plugins"}),
)


def check_route_protocols(record: dict, path: str, problems: Problems) -> None:
    """Kong's mutually exclusive protocol subsets, and what the local gateway can serve."""
    protocols = set(record.get("protocols") or [])
    subsets = [s for s in ({"http", "https"}, {"tcp", "tls", "udp"}, {"grpc", "grpcs"}, {"ws", "wss"}) if protocols & s]
    if len(subsets) > 1:
        problems.add(join(path, "protocols"), "these sets are mutually exclusive: "
                     + ", ".join("(" + ", ".join(sorted(s)) + ")" for s in subsets))
    elif protocols - {"http", "https"}:
        listed = ", ".join(sorted(protocols))
        problems.add(join(path, "protocols"),
                     f"unsupported by the local gateway: protocols {listed} (supported: http, https)")
    elif protocols and "http" not in protocols:
        problems.add(join(path, "protocols"), "unsupported by the local gateway: a route without http "
                     "(it serves plain http only, where Kong would redirect or refuse the request)")


CONSUMER = Record(
    fields={
        "id": t.uuid(),
        "created_at": t.timestamp(),
        "updated_at": t.timestamp(),
        "username": String(),
        "custom_id": String(),
        "tags": t.tags(),
    },
    checks=(at_least_one_of("custom_id", "username"),),
    passthrough=frozenset({"jwt_secrets", "keyauth_credentials", "acls", "plugins", "basicauth_credentials",
                           "hmacauth_credentials", "oauth2_credentials", "mtls_auth_credentials", "groups"}),
)

JWT_SECRET = Record(
    fields={
        "id": t.uuid(),
        "created_at": t.timestamp(),
        "consumer": FOREIGN,
        "key": String(),
        "secret": String(),
        "rsa_public_key": String(),
        "algorithm": String(default="HS256", one_of=JWT_ALGORITHMS),
        "tags": t.tags(),
    },
)

KEYAUTH_CREDENTIAL = Record(
    fields={
        "id": t.uuid(),
        "created_at": t.timestamp(),
        "consumer": FOREIGN,
        "key": String(),
        "ttl": Integer(local=lambda v: "credential ttl (DB-less Kong does not expire keys either)"),
        "tags": t.tags(),
    },
)

ACL = Record(
    fields={
        "id": t.uuid(),
        "created_at": t.timestamp(),
        "consumer": FOREIGN,
        "group": String(required=True),
        "tags": t.tags(),
    },
)

PLUGIN_ENTITY_FIELDS = {
    "id": t.uuid(),
    "name": String(required=True),
    "instance_name": t.name(),
    "created_at": t.timestamp(),
    "updated_at": t.timestamp(),
    "route": FOREIGN,
    "service": FOREIGN,
    "consumer": FOREIGN,
    "enabled": Boolean(default=True),
    "tags": t.tags(),
}

# decK top-level keys: what the local gateway reads, and what it knows but cannot serve.
DOCUMENT_KEYS = {"_format_version", "_transform", "_info", "_workspace", "_konnect", "services", "routes",
                 "consumers", "plugins"}
UNSUPPORTED_SECTIONS = ("upstreams", "targets", "certificates", "ca_certificates", "snis", "consumer_groups",
                        "vaults", "keys", "key_sets", "filter_chains", "partials", "custom_entities",
                        "jwt_secrets", "keyauth_credentials", "acls", "basicauth_credentials",
                        "hmacauth_credentials", "oauth2_credentials", "mtls_auth_credentials", "licenses",
                        "_plugin_configs")
FORMAT_VERSIONS = ("1.1", "2.1", "3.0")


def expand_service_url(raw: dict, path: str, problems: Problems) -> dict:
    """The `url` shorthand: protocol, host, port and path from one URL, as Kong's services schema does."""
    if "url" not in raw:
        return raw
    url = raw["url"]
    if not isinstance(url, str):
        problems.add(join(path, "url"), "expected a string")
        return MISSING
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        problems.add(join(path, "url"), f"invalid port in url '{url}'")
        return MISSING
    protocol = parts.scheme or ("https" if port == 443 else "http")
    expanded = {k: v for k, v in raw.items() if k != "url"}
    expanded.update({
        "protocol": protocol,
        "host": parts.hostname,
        "port": port or {"http": 80, "https": 443}.get(protocol, 80),
        "path": parts.path or None,
    })
    if parts.query or parts.fragment:
        problems.add(join(path, "url"), "a service url cannot carry a query string or fragment")
        return MISSING
    return expanded
