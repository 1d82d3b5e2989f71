"""Kong's schema rules applied to decK files: defaults, types, constraints, references."""

from __future__ import annotations

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.gateway.declarative.loader import ConfigError, load_services, load_text
from services.gateway.declarative.schema import MISSING, Integer, Problems, Record, String
from services.gateway.proxy import Gateway

BASE = """\
_format_version: "3.0"
services:
  - name: svc
    url: http://127.0.0.1:9000/v1
    routes:
      - name: r
        paths: [/r]
"""


def problems_of(text: str, env: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_text(text, env or {})
    return err.value.problems


def test_defaults_are_applied_as_kong_applies_them():
    model = load_text(BASE + "plugins:\n  - name: jwt\n", {})
    service, route, plugin = model.services[0], model.routes[0], model.plugins[0]
    assert (service.protocol, service.host, service.port, service.path) == ("http", "127.0.0.1", 9000, "/v1")
    assert (service.retries, service.connect_timeout, service.read_timeout, service.write_timeout) == (
        5, 60000, 60000, 60000)
    assert route.strip_path is True and route.preserve_host is False and route.protocols == ["http", "https"]
    assert plugin.config["uri_param_names"] == ["jwt"]
    assert plugin.config["header_names"] == ["authorization"]
    assert plugin.config["key_claim_name"] == "iss"
    assert plugin.config["run_on_preflight"] is True
    assert plugin.config["maximum_expiration"] == 0
    assert plugin.protocols == ["grpc", "grpcs", "http", "https"]


def test_ids_are_stable_between_loads():
    first, second = load_text(BASE, {}), load_text(BASE, {})
    assert first.services[0].id == second.services[0].id
    assert first.routes[0].id == second.routes[0].id


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("plugins:\n  - name: jwt\n    config: {maximum_expiration: 100}\n",
         "plugins[0].config.claims_to_verify: must contain 'exp'"),
        ("plugins:\n  - name: jwt\n    config: {claims_to_verify: [iat]}\n",
         "plugins[0].config.claims_to_verify[0]: expected one of: exp, nbf"),
        ("plugins:\n  - name: acl\n    config: {allow: [a], deny: [b]}\n",
         "plugins[0]: only one of these fields must be non-empty: 'config.allow', 'config.deny'"),
        ("plugins:\n  - name: acl\n", "plugins[0]: at least one of these fields must be non-empty"),
        ("plugins:\n  - name: rate-limiting\n    config: {limit_by: ip}\n",
         "plugins[0]: at least one of these fields must be non-empty: 'config.second'"),
        ("plugins:\n  - name: rate-limiting\n    config: {minute: 5, limit_by: header}\n",
         "plugins[0].config.header_name: required field missing"),
        ("plugins:\n  - name: request-size-limiting\n    config: {size_unit: gigabytes}\n",
         "plugins[0].config.size_unit: expected one of: megabytes, kilobytes, bytes"),
        ("plugins:\n  - name: cors\n    config: {origins: ['(unclosed']}\n",
         "plugins[0].config.origins[0]: '(unclosed' is not a valid regex"),
        ("plugins:\n  - name: correlation-id\n    config: {generator: 'uuid#'}\n",
         "plugins[0].config.generator: expected one of: uuid, uuid#counter, tracker"),
        ("plugins:\n  - name: key-auth\n    config: {key_in_body: true}\n",
         "plugins[0].config.key_in_body: unsupported by the local gateway"),
        ("plugins:\n  - name: basic-auth\n",
         "plugins[0].name: plugin 'basic-auth' is unsupported by the local gateway"),
        ("plugins:\n  - name: jwt\n    route: nowhere\n", "plugins[0].route: no route with name or id 'nowhere'"),
        ("plugins:\n  - name: jwt\n  - name: jwt\n", "plugins[1]: UNIQUE violation"),
        ("consumers:\n  - tags: [x]\n", "consumers[0]: at least one of these fields must be non-empty: 'custom_id'"),
        ("consumers:\n  - username: a\n    jwt_secrets: [{key: k, algorithm: RS256}]\n",
         "consumers[0].jwt_secrets[0].rsa_public_key: required field missing"),
        ("consumers:\n  - username: a\n    jwt_secrets: [{key: k, algorithm: RS256, rsa_public_key: nope}]\n",
         "consumers[0].jwt_secrets[0].rsa_public_key: invalid key"),
        ("consumers:\n  - username: a\n  - username: a\n", "consumers[1].username: UNIQUE violation"),
        ("upstreams:\n  - name: u\n", "upstreams: unsupported by the local gateway"),
        ("colour: blue\n", "colour: unknown field"),
    ],
)
def test_schema_problems_name_the_field(snippet, expected):
    assert any(expected in p for p in problems_of(BASE + snippet)), problems_of(BASE + snippet)


@pytest.mark.parametrize(
    ("route_line", "expected"),
    [
        ("        methods: [get]\n", "services[0].routes[0].methods[0]: invalid value: get"),
        ("        strip_path: 'yes please'\n", "services[0].routes[0].strip_path: expected a boolean"),
        ("        paths: [/r, relative]\n", "should start with: / (fixed path) or ~/ (regex path)"),
        ("        paths: ['~/r/(?<id>\\\\d+)']\n", "services[0].routes[0].paths: unsupported by the local gateway"),
        ("        protocols: [grpc]\n", "services[0].routes[0].protocols: unsupported by the local gateway"),
        ("        path_handling: v1\n", "services[0].routes[0].path_handling: unsupported by the local gateway"),
        ("        hosts: ['*.clinic.test']\n", "services[0].routes[0].hosts: unsupported by the local gateway"),
        ("        protocols: [https]\n", "services[0].routes[0].protocols: unsupported by the local gateway: a route "
                                        "without http"),
    ],
)
def test_route_problems(route_line, expected):
    text = BASE.replace("        paths: [/r]\n", "        paths: [/r]\n" + route_line) if "paths:" not in route_line \
        else BASE.replace("        paths: [/r]\n", route_line)
    assert any(expected in p for p in problems_of(text)), problems_of(text)


def test_service_fields_are_checked():
    text = BASE.replace("    url: http://127.0.0.1:9000/v1\n",
                        "    host: 127.0.0.1\n    port: 70000\n    read_timeout: 0\n    protocol: https\n")
    problems = problems_of(text)
    assert "services[0].port: value should be between 0 and 65535" in problems
    assert "services[0].read_timeout: value should be between 1 and 2147483646" in problems
    assert any(p.startswith("services[0].protocol: unsupported by the local gateway") for p in problems)


def test_duplicate_yaml_keys_are_refused():
    duplicated = BASE.replace("- name: r\n", "- name: r\n        name: q\n")
    assert any("found duplicate key 'name'" in p for p in problems_of(duplicated))


def test_empty_strings_are_refused_unless_kong_allows_them():
    problems = problems_of(BASE + "consumers:\n  - username: ''\n")
    assert "consumers[0].username: length must be at least 1" in problems


def test_integer_fields_accept_whole_floats_and_refuse_fractions():
    problems = Problems()
    assert Integer().validate(5.0, "x", problems) == 5
    assert Integer().validate(5.5, "y", problems) is MISSING
    assert [str(p) for p in problems] == ["y: expected an integer"]


def test_records_report_unknown_and_missing_fields_together():
    problems = Problems()
    Record(fields={"a": String(required=True)}).validate({"b": 1}, "thing", problems)
    assert sorted(str(p) for p in problems) == ["thing.a: required field missing", "thing.b: unknown field"]


def test_consumer_credentials_and_groups_are_loaded():
    text = BASE + (
        "consumers:\n"
        "  - username: portal\n"
        "    keyauth_credentials: [{key: k1}]\n"
        "    acls: [{group: partners}, {group: partners}, {group: billing}]\n"
    )
    model = load_text(text, {})
    credential = model.keyauth_credentials["k1"]
    assert credential.consumer.username == "portal"
    assert credential.consumer.groups == ["partners", "billing"]
    assert "k1" not in credential.id


def test_a_duplicate_credential_key_is_named_by_where_it_is_never_by_its_value():
    text = BASE + (
        "consumers:\n"
        "  - username: a\n    keyauth_credentials: [{key: sk-live-0123456789}]\n"
        "  - username: b\n    keyauth_credentials: [{key: sk-live-0123456789}]\n"
    )
    with pytest.raises(ConfigError) as err:
        load_text(text, {})
    assert err.value.problems == [
        "consumers[1].keyauth_credentials[0].key: UNIQUE violation detected on this key "
        "(also at consumers[0].keyauth_credentials[0].key)"
    ]
    assert "sk-live-0123456789" not in str(err.value)


def test_duplicate_names_are_still_quoted():
    duplicate = "  - name: svc\n    id: 0b6c9e3e-6f0a-4a49-9a55-3d3f5f1c2b10\n    url: http://127.0.0.1:9001\n"
    problems = problems_of(BASE + duplicate)
    assert problems == ["services[1].name: UNIQUE violation detected on 'svc' (also at services[0].name)"]


def test_a_public_key_is_parsed_once_whatever_uses_it(monkeypatch):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    text = BASE + (
        "      - {name: r2, paths: [/r2], plugins: [{name: jwt}]}\n"
        "plugins:\n  - name: jwt\n"
        "consumers:\n  - username: staff\n    jwt_secrets:\n      - key: issuer\n        algorithm: RS256\n"
        "        rsa_public_key: |\n" + "".join(f"          {line}\n" for line in pem.splitlines())
    )
    parsed = []
    real = serialization.load_pem_public_key
    monkeypatch.setattr(serialization, "load_pem_public_key", lambda data, *a, **kw: parsed.append(1) or real(data))
    model = load_text(text, {})
    Gateway(model, 8000, pool=None)  # builds both jwt plugin instances
    assert len(model.plugins) == 2
    assert len(parsed) == 1
    assert model.jwt_secrets["issuer"].verifier.public_numbers() == key.public_numbers()


def test_services_alone_can_be_read_from_a_parsed_document():
    document = yaml.safe_load(BASE + "  - {name: bare, host: inbox.clinic.svc}\nconsumers: [{username: x, "
                                     "jwt_secrets: [{algorithm: RS256, rsa_public_key: not-a-key}]}]\n")
    services = load_services(document)
    assert [(s.name, s.host, s.port, s.path) for s in services] == [
        ("svc", "127.0.0.1", 9000, "/v1"), ("bare", "inbox.clinic.svc", 80, None)]
    with pytest.raises(ConfigError, match=r"services\[0\].url: invalid port"):
        load_services({"services": [{"name": "s", "url": "http://h:port"}]})
