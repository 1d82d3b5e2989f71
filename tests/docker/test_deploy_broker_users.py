"""The broker's users in deploy/ (docs/bus-security.md): every service signs in to RabbitMQ as its own user,
the one deploy/rabbitmq/definitions.json gives its permissions, and the compose broker loads that file with
each user's password hash, made by make-secrets.sh from the password that service is given.

A service signing in as another would publish that producer's event types and read its queues; a hash that
does not match the service's password would keep it from connecting at all.
"""

from __future__ import annotations

import base64
import json
import urllib.parse

import pytest

from services.kit.bus.users import password_hash
from tests.docker import deploy_files as d

SERVICES = d.deployed_services()


def committed_definitions() -> dict:
    return json.loads(d.BROKER_DEFINITIONS.read_text())


def without_hashes(definitions: dict) -> dict:
    return {**definitions, "users": [{**user, "password_hash": ""} for user in definitions["users"]]}


def test_the_definitions_hold_one_user_per_deployed_service_and_no_password():
    definitions = committed_definitions()
    assert sorted(user["name"] for user in definitions["users"]) == sorted(SERVICES)
    assert all(user["password_hash"] == "" for user in definitions["users"])
    assert {p["user"] for p in definitions["permissions"]} == set(SERVICES)


@pytest.mark.parametrize("service", SERVICES)
def test_compose_signs_each_service_in_as_its_own_broker_user(compose, generated_secrets, service):
    variables = generated_secrets[1]
    raw = d.environment_of(compose["services"][service])["AMQP_URL"]
    variable = f"RABBITMQ_{d.env_prefix(service)}_PASSWORD"
    assert f"${{{variable}:?" in raw
    url = urllib.parse.urlsplit(d.interpolate(raw, variables))
    assert (url.username, url.password) == (service, variables[variable])
    assert url.path == "/clinic"


def test_make_secrets_gives_every_broker_user_its_own_password_and_the_broker_their_hashes(compose, generated_secrets):
    workdir, variables = generated_secrets
    passwords = {service: variables[f"RABBITMQ_{d.env_prefix(service)}_PASSWORD"] for service in SERVICES}
    assert len(set(passwords.values())) == len(SERVICES) and all(len(p) >= 32 for p in passwords.values())
    loaded = json.loads((workdir / compose["secrets"]["rabbitmq_definitions"]["file"]).read_text())
    # The committed definitions exactly, hashes apart.
    assert without_hashes(loaded) == committed_definitions()
    for user in loaded["users"]:
        salt = base64.b64decode(user["password_hash"])[:4]
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        assert password_hash(passwords[user["name"]], salt) == user["password_hash"], user["name"]
    # Nobody signs in with another service's password.
    assert password_hash(passwords["web"], b"\0\0\0\0") != password_hash(passwords["audit"], b"\0\0\0\0")


def test_compose_broker_loads_the_definitions_and_creates_no_default_user(compose):
    rabbitmq = compose["services"]["rabbitmq"]
    env = d.environment_of(rabbitmq)
    assert not any(key.startswith("RABBITMQ_DEFAULT_") for key in env)
    assert "rabbitmq_definitions" in d.compose_secret_names(rabbitmq)
    conf = {}
    for line in (d.COMPOSE_DIR / "rabbitmq" / "rabbitmq.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            conf[key.strip()] = value.strip()
    assert conf["load_definitions"] == "/run/secrets/rabbitmq_definitions"
    assert conf["loopback_users.guest"] == "true"
    # Only the broker holds the hashes.
    holders = [
        name
        for name, service in compose["services"].items()
        if "rabbitmq_definitions" in d.compose_secret_names(service)
    ]
    assert holders == ["rabbitmq"]


def test_make_secrets_keeps_broker_passwords_and_follows_the_definitions(compose_copy):
    before = d.parse_dotenv((compose_copy / ".env").read_text())
    definitions = committed_definitions()
    # A permission changed in the committed file reaches the broker's copy on the next run.
    definitions["permissions"][0]["read"] = "^(changed)$"
    (compose_copy.parent / d.BROKER_DIR.name / "definitions.json").write_text(json.dumps(definitions, indent=2))
    result = d.run_make_secrets(compose_copy)
    assert result.returncode == 0, result.stderr
    after = d.parse_dotenv((compose_copy / ".env").read_text())
    assert {k: v for k, v in after.items() if k.startswith("RABBITMQ_")} == {
        k: v for k, v in before.items() if k.startswith("RABBITMQ_")
    }
    loaded = json.loads((compose_copy / "secrets" / "rabbitmq_definitions.json").read_text())
    assert without_hashes(loaded) == definitions
    # A user the script has no password for stops it rather than leaving a user that cannot sign in.
    definitions["users"].append({**definitions["users"][0], "name": "stranger"})
    (compose_copy.parent / d.BROKER_DIR.name / "definitions.json").write_text(json.dumps(definitions, indent=2))
    result = d.run_make_secrets(compose_copy)
    assert result.returncode != 0 and "no password for the broker user stranger" in result.stderr


@pytest.mark.parametrize("service", SERVICES)
def test_k8s_signs_each_service_in_as_its_own_broker_user(service):
    container = d.k8s_objects("Deployment")[service]["spec"]["template"]["spec"]["containers"][0]
    url = urllib.parse.urlsplit(d.k8s_environment(container)["AMQP_URL"])
    assert url.username == service and url.path == "/clinic"
