"""Read a decK file and turn it into the GatewayModel, or list every problem with the field's path.

The order is decK's and Kong's: render the env templates on the raw text, parse
the YAML, validate each entity against Kong's schema (defaults filled in),
then resolve references and uniqueness as Kong's declarative loader does.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from services.gateway.declarative import entities as e
from services.gateway.declarative.schema import MISSING, Problems, Record, join
from services.gateway.declarative.template import TemplateError, render
from services.gateway.declarative.vault import resolve_references
from services.gateway.model import (
    Consumer,
    GatewayModel,
    JwtSecret,
    KeyAuthCredential,
    PluginInstance,
    Route,
    Service,
    find_consumer,
)
from services.gateway.plugins import KONG_BUNDLED, REGISTRY
from services.gateway.plugins.base import protocols_field

# Entities without an `id` get a stable one derived from their natural key, so ids (and the
# X-Consumer-ID header) do not change from one start to the next.
_ID_NAMESPACE = uuid.UUID("6f1c3a52-7c8e-4b5f-9a0e-2d4c8b1e7a90")
_ASYMMETRIC = ("RS", "ES", "PS", "Ed")
# Unique keys whose value is a credential: a duplicate is reported by where it is, never by what it is.
_SECRET_KEYS = frozenset({"keyauth_credentials.key", "jwt_secrets.key"})


class ConfigError(Exception):
    """The file cannot be served; `problems` lists each one as 'path: message'."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))


def stable_id(*parts: object) -> str:
    return str(uuid.uuid5(_ID_NAMESPACE, ":".join(str(p) for p in parts)))


class _Loader(yaml.SafeLoader):
    """YAML with duplicate keys refused, as decK's YAML library refuses them."""


def _mapping(loader: _Loader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _value in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_file(path: Path, environ: Mapping[str, str], vault: Mapping[str, str] | None = None) -> GatewayModel:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the file: {exc.strerror}"]) from None
    return load_text(text, environ, str(path), vault)


def load_text(text: str, environ: Mapping[str, str], source: str = "kong.yml",
              vault: Mapping[str, str] | None = None) -> GatewayModel:
    """`environ`: the DECK_* variables of the template; `vault`: what `{vault://env/...}` references
    read (Kong's env vault reads the process environment; so does this one by default)."""
    try:
        rendered = render(text, environ)
    except TemplateError as exc:
        raise ConfigError(source, [f"line {exc.line}: {exc.message}"]) from None
    try:
        document = yaml.load(rendered, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(source, [f"{where}{getattr(exc, 'problem', None) or exc}"]) from None
    builder = _Builder(os.environ if vault is None else vault)
    model = builder.build(document)
    if builder.problems:
        raise ConfigError(source, [str(p) for p in builder.problems])
    return model


def load_services(document: Any, source: str = "kong.yml") -> list[Service]:
    """Only the `services` of an already rendered and parsed decK document (their `url` expanded,
    defaults applied, routes checked), for tools that need the upstreams without the credentials."""
    builder = _Builder()
    if isinstance(document, dict):
        for path, raw in _items(document, "services", builder.problems):
            builder.add_service(path, raw)
    if builder.problems:
        raise ConfigError(source, [str(p) for p in builder.problems])
    return builder.services


def _items(document: dict, key: str, problems: Problems, path: str = "") -> list[tuple[str, Any]]:
    value = document.get(key)
    where = join(path, key)
    if value is None:
        return []
    if not isinstance(value, list):
        problems.add(where, "expected an array")
        return []
    return [(join(where, i), item) for i, item in enumerate(value)]


class _Builder:
    def __init__(self, vault: Mapping[str, str] | None = None) -> None:
        self.vault: Mapping[str, str] = {} if vault is None else vault
        self.problems = Problems()
        self.services: list[Service] = []
        self.services_by_ref: dict[str, Service] = {}
        self.routes: list[Route] = []
        self.routes_by_ref: dict[str, Route] = {}
        self.consumers: list[Consumer] = []
        self.plugins: list[PluginInstance] = []
        self.jwt_secrets: dict[str, JwtSecret] = {}
        self.keyauth: dict[str, KeyAuthCredential] = {}
        self.ids: dict[str, str] = {}
        self.pending_plugins: list[tuple[str, dict, str | None, str | None]] = []  # path, record, route, service

    # --- document -------------------------------------------------------------------------
    def build(self, document: Any) -> GatewayModel:
        problems = self.problems
        if not isinstance(document, dict):
            problems.add("", "the file must hold a YAML mapping with _format_version, services, consumers, ...")
            return GatewayModel([], [], [], [], {}, {})
        for key, value in document.items():
            if key in e.UNSUPPORTED_SECTIONS:
                if value:
                    problems.add(str(key), "unsupported by the local gateway: this kind of entity is not served")
            elif key not in e.DOCUMENT_KEYS:
                problems.add(str(key), "unknown field")
        version = document.get("_format_version")
        if version is None:
            problems.add("_format_version", "required field missing")
        elif str(version) not in e.FORMAT_VERSIONS:
            problems.add("_format_version", "expected one of: " + ", ".join(e.FORMAT_VERSIONS))
        if "_transform" in document and not isinstance(document["_transform"], bool):
            problems.add("_transform", "expected a boolean")

        for path, raw in _items(document, "services", problems):
            self.add_service(path, raw)
        for path, raw in _items(document, "routes", problems):
            self.add_route(path, raw, None)
        for path, raw in _items(document, "consumers", problems):
            self.add_consumer(path, raw)
        for path, raw in _items(document, "plugins", problems):
            self.add_plugin(path, raw, None, None)
        self.resolve_plugins()
        return GatewayModel(self.services, self.routes, self.consumers, self.plugins, self.jwt_secrets,
                            self.keyauth)

    def claim(self, kind: str, key: str, path: str) -> bool:
        """Kong's UNIQUE constraint on names, usernames, keys and ids."""
        slot = f"{kind}:{key}"
        if slot in self.ids:
            what = "this key" if kind in _SECRET_KEYS else f"'{key}'"
            self.problems.add(path, f"UNIQUE violation detected on {what} (also at {self.ids[slot]})")
            return False
        self.ids[slot] = path
        return True

    # --- services and routes --------------------------------------------------------------
    def add_service(self, path: str, raw: Any) -> None:
        if not isinstance(raw, dict):
            self.problems.add(path, "expected a record")
            return
        expanded = e.expand_service_url(raw, path, self.problems)
        if expanded is MISSING:
            return
        record = e.SERVICE.validate(expanded, path, self.problems)
        if record is MISSING:
            return
        service_id = record.get("id") or stable_id("services", record.get("name") or path)
        if not self.claim("services.id", service_id, join(path, "id")):
            return
        if record.get("name") and not self.claim("services.name", record["name"], join(path, "name")):
            return
        service = Service(
            id=service_id,
            name=record.get("name"),
            protocol=record["protocol"],
            host=record["host"],
            port=record["port"],
            path=record.get("path"),
            retries=record["retries"],
            connect_timeout=record["connect_timeout"],
            write_timeout=record["write_timeout"],
            read_timeout=record["read_timeout"],
            enabled=record["enabled"],
        )
        self.services.append(service)
        self.services_by_ref[service.id] = service
        if service.name:
            self.services_by_ref[service.name] = service
        for route_path, route_raw in _items(record, "routes", self.problems, path):
            self.add_route(route_path, route_raw, service)
        for plugin_path, plugin_raw in _items(record, "plugins", self.problems, path):
            self.add_plugin(plugin_path, plugin_raw, None, service.id)

    def resolve(self, ref: Any, table: Mapping[str, Any], kind: str, path: str) -> Any:
        if isinstance(ref, dict):
            ref = ref.get("id") or ref.get("name") or ref.get("username")
        if not isinstance(ref, str) or not ref:
            self.problems.add(path, f"expected the name or id of a {kind}")
            return None
        found = table.get(ref)
        if found is None:
            self.problems.add(path, f"no {kind} with name or id '{ref}'")
        return found

    def add_route(self, path: str, raw: Any, service: Service | None) -> None:
        if not isinstance(raw, dict):
            self.problems.add(path, "expected a record")
            return
        record = e.ROUTE.validate(raw, path, self.problems)
        if record is MISSING:
            return
        before = len(self.problems.items)
        e.check_route_protocols(record, path, self.problems)
        if service is None:
            if record.get("service") is None:
                self.problems.add(join(path, "service"), "unsupported by the local gateway: a route without a service")
                return
            service = self.resolve(record["service"], self.services_by_ref, "service", join(path, "service"))
        if service is None or len(self.problems.items) > before:
            return
        route_id = record.get("id") or stable_id("routes", record.get("name") or path)
        if not self.claim("routes.id", route_id, join(path, "id")):
            return
        if record.get("name") and not self.claim("routes.name", record["name"], join(path, "name")):
            return
        route = Route(
            id=route_id,
            name=record.get("name"),
            service=service,
            protocols=record["protocols"],
            methods=record.get("methods") or [],
            paths=record.get("paths") or [],
            strip_path=record["strip_path"],
            preserve_host=record["preserve_host"],
            order=len(self.routes),
        )
        self.routes.append(route)
        self.routes_by_ref[route.id] = route
        if route.name:
            self.routes_by_ref[route.name] = route
        for plugin_path, plugin_raw in _items(record, "plugins", self.problems, path):
            self.add_plugin(plugin_path, plugin_raw, route.id, None)

    # --- consumers and credentials ----------------------------------------------------------
    def add_consumer(self, path: str, raw: Any) -> None:
        if not isinstance(raw, dict):
            self.problems.add(path, "expected a record")
            return
        record = e.CONSUMER.validate(raw, path, self.problems)
        if record is MISSING:
            return
        natural = record.get("username") or record.get("custom_id")
        consumer_id = record.get("id") or stable_id("consumers", natural)
        ok = self.claim("consumers.id", consumer_id, join(path, "id"))
        for field_name in ("username", "custom_id"):
            if record.get(field_name):
                ok = self.claim(f"consumers.{field_name}", record[field_name], join(path, field_name)) and ok
        if not ok:
            return
        consumer = Consumer(id=consumer_id, username=record.get("username"), custom_id=record.get("custom_id"))
        self.consumers.append(consumer)
        for kind in ("basicauth_credentials", "hmacauth_credentials", "oauth2_credentials", "mtls_auth_credentials",
                     "groups"):
            if record.get(kind):
                self.problems.add(join(path, kind),
                                  "unsupported by the local gateway: this kind of entity is not served")
        if record.get("plugins"):
            self.problems.add(join(path, "plugins"),
                              "unsupported by the local gateway: plugins scoped to a consumer")
        for item_path, item in _items(record, "jwt_secrets", self.problems, path):
            self.add_jwt_secret(item_path, item, consumer)
        for item_path, item in _items(record, "keyauth_credentials", self.problems, path):
            self.add_keyauth(item_path, item, consumer)
        for item_path, item in _items(record, "acls", self.problems, path):
            acl = e.ACL.validate(item, item_path, self.problems)
            if acl is not MISSING and acl["group"] not in consumer.groups:
                consumer.groups.append(acl["group"])

    def add_jwt_secret(self, path: str, raw: Any, consumer: Consumer) -> None:
        record = e.JWT_SECRET.validate(raw, path, self.problems)
        if record is MISSING:
            return
        algorithm = record["algorithm"]
        key = record.get("key") or uuid.uuid4().hex
        secret = record.get("secret") or (uuid.uuid4().hex if algorithm.startswith("HS") else None)
        verifier: Any = secret.encode() if secret is not None and algorithm.startswith("HS") else None
        if algorithm.startswith(_ASYMMETRIC):
            pem = record.get("rsa_public_key")
            if not pem:
                self.problems.add(join(path, "rsa_public_key"), "required field missing")
                return
            try:
                verifier = serialization.load_pem_public_key(pem.encode())  # parsed here, once
            except (ValueError, TypeError, UnsupportedAlgorithm):
                self.problems.add(join(path, "rsa_public_key"), "invalid key")
                return
        if not self.claim("jwt_secrets.key", key, join(path, "key")):
            return
        self.jwt_secrets[key] = JwtSecret(
            id=record.get("id") or stable_id("jwt_secrets", key),
            key=key,
            algorithm=algorithm,
            secret=secret,
            consumer=consumer,
            verifier=verifier,
        )

    def add_keyauth(self, path: str, raw: Any, consumer: Consumer) -> None:
        record = e.KEYAUTH_CREDENTIAL.validate(raw, path, self.problems)
        if record is MISSING:
            return
        key = record.get("key") or uuid.uuid4().hex
        if not self.claim("keyauth_credentials.key", key, join(path, "key")):
            return
        # The id travels upstream as X-Credential-Identifier, so it is derived from the position, never the key.
        credential_id = record.get("id") or stable_id("keyauth_credentials", consumer.id, path)
        self.keyauth[key] = KeyAuthCredential(id=credential_id, key=key, consumer=consumer)

    # --- plugins ----------------------------------------------------------------------------
    def add_plugin(self, path: str, raw: Any, route_ref: str | None, service_ref: str | None) -> None:
        if not isinstance(raw, dict):
            self.problems.add(path, "expected a record")
            return
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            self.problems.add(join(path, "name"), "required field missing" if name is None else "expected a string")
            return
        spec = REGISTRY.get(name)
        if spec is None:
            if name in KONG_BUNDLED:
                self.problems.add(join(path, "name"), f"plugin '{name}' is unsupported by the local gateway")
            else:
                self.problems.add(join(path, "name"),
                                  f"plugin '{name}' not enabled; add it to the 'plugins' configuration property")
            return
        raw = dict(raw)
        if spec.preprocess is not None:
            raw["config"] = spec.preprocess(raw.get("config"), join(path, "config"), self.problems)
        schema = Record(
            fields={**e.PLUGIN_ENTITY_FIELDS, "config": spec.config, "protocols": protocols_field(spec.protocols)},
            checks=spec.checks,
        )
        record = schema.validate(raw, path, self.problems)
        if record is MISSING:
            return
        if record.get("consumer") is not None:
            self.problems.add(join(path, "consumer"), "unsupported by the local gateway: plugins scoped to a consumer")
            return
        for key, nested in (("route", route_ref), ("service", service_ref)):
            if nested is not None and record.get(key) is not None:
                self.problems.add(join(path, key), f"a nested plugin takes its {key} from where it is declared")
                return
        before = len(self.problems.items)
        record["config"] = resolve_references(spec.config, record["config"], join(path, "config"), self.vault,
                                              self.problems)
        if len(self.problems.items) > before:
            return
        self.pending_plugins.append((path, record, route_ref, service_ref))

    def resolve_plugins(self) -> None:
        for path, record, route_ref, service_ref in self.pending_plugins:
            route = service = None
            if route_ref is not None or record.get("route") is not None:
                route = self.resolve(route_ref or record["route"], self.routes_by_ref, "route", join(path, "route"))
                if route is None:
                    continue
            if service_ref is not None or record.get("service") is not None:
                service = self.resolve(service_ref or record["service"], self.services_by_ref, "service",
                                       join(path, "service"))
                if service is None:
                    continue
            route_id, service_id = (route.id if route else None), (service.id if service else None)
            scope = f"name={record['name']},route={route_id},service={service_id}"
            if not self.claim("plugins.scope", scope, path):
                continue
            plugin_id = record.get("id") or stable_id("plugins", scope)
            if not self.claim("plugins.id", plugin_id, join(path, "id")):
                continue
            for key in ("anonymous",):
                ref = record["config"].get(key)
                if ref and find_consumer(self.consumers, ref) is None:
                    self.problems.add(join(path, f"config.{key}"), f"no consumer with id or username '{ref}'")
            self.plugins.append(PluginInstance(
                id=plugin_id,
                name=record["name"],
                config=record["config"],
                protocols=record["protocols"],
                enabled=record["enabled"],
                route=route,
                service=service,
                path=path,
            ))
