"""Shared fixtures: the real embedded database server and a private RabbitMQ vhost.

Set TEST_MONGO_URI to run the suite against a real MongoDB instead of nx-27017.
Set TEST_AMQP_URL (a broker where this user may create vhosts) to use another broker.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.parse
import uuid

import pika
import pymongo
import pytest

from services.kit.embedded_mongo import EmbeddedMongo, free_port

AMQP_BASE = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory):
    external = os.environ.get("TEST_MONGO_URI")
    if external:
        yield external
        return
    server = EmbeddedMongo(data_dir=tmp_path_factory.mktemp("nx-27017"), port=free_port())
    server.start()
    yield server.uri
    server.stop()


@pytest.fixture(scope="session")
def mongo_client(mongo_uri):
    client = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=5000)
    yield client
    client.close()


@pytest.fixture
def db_name(mongo_client):
    """A database name of this test's own; dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    try:
        mongo_client.drop_database(name)
    except pymongo.errors.PyMongoError:
        pass


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def vhost_url(vhost: str) -> str:
    parts = urllib.parse.urlsplit(AMQP_BASE)
    return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(vhost, safe="")))


def delete_vhost(vhost: str) -> None:
    """Delete the vhost and the broker users stacks made for it (services.kit.bus.users: users are
    broker-wide, so deleting the vhost leaves them; a stack deletes its own at stop, this catches
    any a failed stop left)."""
    from services.kit.bus.users import delete_vhost_users

    try:
        delete_vhost_users(vhost)
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(scope="session")
def amqp_url():
    """A RabbitMQ vhost private to this test session (the URL is an administrator's of it: a stack
    started on it gives its services users of their own), deleted at the end with those users."""
    if not shutil.which("rabbitmqctl"):
        pytest.fail("rabbitmqctl not found: the integration suite needs a local RabbitMQ (see README)")
    vhost = f"clinic-test-{uuid.uuid4().hex[:8]}"
    user = urllib.parse.urlsplit(AMQP_BASE).username or "guest"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    url = vhost_url(vhost)
    pika.BlockingConnection(pika.URLParameters(url)).close()
    yield url
    delete_vhost(vhost)


@pytest.fixture
def private_amqp_url():
    """A vhost of this test's own, for a test that starts a whole stack beside the session's: two
    deployments on one vhost refuse each other's queues (services/kit/bus/topology.py)."""
    vhost = f"clinic-test-{uuid.uuid4().hex[:8]}"
    user = urllib.parse.urlsplit(AMQP_BASE).username or "guest"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield vhost_url(vhost)
    finally:
        delete_vhost(vhost)


@pytest.fixture
def directory_overrides() -> dict[str, str]:
    """Settings for `dut` beyond the test defaults; a test module that needs others overrides this fixture."""
    return {}


@pytest.fixture
def dut(mongo_uri, db_name, tmp_path, directory_overrides):
    """The directory under test: the real app on this test's own database, the demo agencies seeded
    (tests/integration/directory_fixtures.py)."""
    from tests.integration.directory_fixtures import start_directory

    return start_directory(mongo_uri, db_name, tmp_path, **directory_overrides)


@pytest.fixture
def name_prefix():
    """A prefix for exchange and queue names so tests sharing the vhost never meet."""
    return f"t{uuid.uuid4().hex[:8]}"
