"""The per-service broker users' grants (services.kit.bus.users) and the deployment's broker definitions
(deploy/rabbitmq/definitions.json): only the audit user reaches the audit queue, nobody reaches the
default exchange or the shared names' configuration, and each user's routing keys are the publishing
policy's and its consumers' subscriptions."""

from __future__ import annotations

import base64
import hashlib
import json
import re

import pytest

from services.kit.bus import users
from services.kit.bus.__main__ import deployment_definitions, main
from services.kit.bus.signing import POLICY
from services.kit.settings import REPO_ROOT

DEFINITIONS = REPO_ROOT / "deploy" / "rabbitmq" / "definitions.json"
AUDIT_NAMES = ("audit.records", "audit.records.retry", "audit.records.parking", "audit.records.republish")


def matches(pattern: str, name: str) -> bool:
    return re.search(pattern, name) is not None  # RabbitMQ: an unanchored regular expression search


def test_the_deploy_file_is_what_the_command_prints(capsys):
    assert json.loads(DEFINITIONS.read_text()) == deployment_definitions()
    assert main(["broker-definitions"]) == 0
    assert json.loads(capsys.readouterr().out) == deployment_definitions()


def test_no_user_in_the_file_can_sign_in_until_given_a_password():
    definitions = json.loads(DEFINITIONS.read_text())
    assert {u["name"] for u in definitions["users"]} == set(users.SERVICES)
    assert all(u["password_hash"] == "" and u["tags"] == [] for u in definitions["users"])


@pytest.mark.parametrize("service", users.SERVICES)
def test_only_the_audit_user_reaches_the_audit_queue(service):
    grant = users.grant(service)
    for name in AUDIT_NAMES:
        for pattern in (grant.configure, grant.write, grant.read):
            assert matches(pattern, name) == (service == "audit"), (service, name, pattern)


@pytest.mark.parametrize("service", users.SERVICES)
def test_no_user_reaches_the_default_exchange_or_configures_what_is_shared(service):
    grant = users.grant(service)
    for name in ("amq.default", "", "amq.direct", "amq.topic", "clinic.events.unrouted"):
        assert not any(matches(p, name) for p in (grant.configure, grant.write, grant.read)), name
    assert not matches(grant.configure, "clinic.events")
    assert matches(grant.write, "clinic.events") and matches(grant.read, "clinic.events")
    assert matches(grant.configure, f"{service}.some-queue.retry")
    other = "inbox" if service != "inbox" else "web"
    assert not matches(grant.read, f"{other}.board-item-deliveries")


@pytest.mark.parametrize("service", users.SERVICES)
def test_each_user_publishes_the_policys_event_types_and_binds_only_its_subscriptions(service):
    grant = users.grant(service)
    for event_type, producers in POLICY.items():
        assert matches(grant.topic_write, event_type) == (service in producers), event_type
    assert not matches(grant.topic_write, "board_item.delivery_requested.v1.extra")
    assert not matches(grant.topic_write, "#")
    audit_stream = ("phi.accessed.v1", "security_event.recorded.v1")
    assert all(matches(grant.topic_read, t) == (service == "audit") for t in audit_stream)
    assert matches(grant.topic_read, "session.revoked.v1")
    assert not matches(grant.topic_read, "#") and not matches(grant.topic_read, "*.accessed.v1")


def test_the_password_hash_is_rabbitmqs_salted_sha256():
    decoded = base64.b64decode(users.password_hash("s3cret", salt=b"\x01\x02\x03\x04"))
    assert decoded == b"\x01\x02\x03\x04" + hashlib.sha256(b"\x01\x02\x03\x04s3cret").digest()


def test_a_stacks_users_are_named_for_their_vhost_and_stack():
    assert users.user_name("clinic-test-1", "inbox", "ab12cd34") == "clinic-test-1.ab12cd34.inbox"
    assert users.user_name("/", "inbox") == "clinic.inbox"
    assert users.vhost_of("amqp://guest:guest@127.0.0.1:5672/") == "/"
    assert users.vhost_of("amqp://guest:guest@127.0.0.1:5672/clinic-test-1") == "clinic-test-1"
    url = users.service_url("amqps://guest:guest@broker:5671/v%2Fx?heartbeat=30", "v/x.inbox", "p@ss")
    assert url == "amqps://v%2Fx.inbox:p%40ss@broker:5671/v%2Fx?heartbeat=30"
