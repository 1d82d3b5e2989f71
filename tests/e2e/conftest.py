"""The whole system started as `make run` starts it, on free ports, against the
session's embedded database and private RabbitMQ vhost."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
import requests

from clinic.inbox.v1 import inbox_pb2_grpc
from services.kit.service_identity import ServiceTokens
from services.launcher import Ports, Stack, StackConfig

DEMO_PASSWORD = "demo-Password-2026"


@pytest.fixture(scope="session")
def stack(tmp_path_factory, mongo_uri, amqp_url):
    prefix = f"e2e{uuid.uuid4().hex[:6]}_"
    config = StackConfig(
        run_dir=tmp_path_factory.mktemp("run"),
        ports=Ports.free(),
        mongo_uri=mongo_uri,
        amqp_url=amqp_url,
        extra_env={"MONGO_DB_PREFIX": prefix, "PASSWORD_HASH_PROFILE": "fast"},
    )
    system = Stack(config)
    system.db_prefix = prefix
    try:
        system.start()
    except Exception:
        system.stop()
        raise
    yield system
    system.stop()


class Client:
    """A staff member's session through the gateway."""

    def __init__(self, base_url: str, username: str, password: str = DEMO_PASSWORD):
        self.base_url = base_url
        self.http = requests.Session()
        reply = self.http.post(f"{base_url}/api/v1/auth/token", json={"username": username, "password": password})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        self.token = body["access_token"]
        self.refresh_token = body["refresh_token"]
        self.staff_id = body["staff"]["id"]
        self.agency_id = body["staff"]["agency_id"]
        self.http.headers["Authorization"] = f"Bearer {self.token}"

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.http.get(f"{self.base_url}{path}", **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return self.http.post(f"{self.base_url}{path}", **kwargs)

    def put(self, path: str, **kwargs) -> requests.Response:
        return self.http.put(f"{self.base_url}{path}", **kwargs)

    def patch(self, path: str, **kwargs) -> requests.Response:
        return self.http.patch(f"{self.base_url}{path}", **kwargs)

    def delete(self, path: str, **kwargs) -> requests.Response:
        return self.http.delete(f"{self.base_url}{path}", **kwargs)

    def tree(self) -> dict:
        reply = self.get("/api/v1/board")
        assert reply.status_code == 200, reply.text
        return reply.json()

    def folder(self, folder_id: str) -> dict:
        return next(f for f in self.tree()["folders"] if f["id"] == folder_id)

    def items(self, **params) -> dict:
        reply = self.get("/api/v1/board/items", params=params)
        assert reply.status_code == 200, reply.text
        return reply.json()

    def send(self, **body) -> requests.Response:
        body.setdefault("subject", "Schedule question")
        body.setdefault("body", "Can we move the 3pm intake?")
        return self.post("/api/v1/messages", json=body)

    def board(self, **params) -> dict:
        reply = self.get("/api/v1/messages", params=params)
        assert reply.status_code == 200, reply.text
        return reply.json()


@pytest.fixture(scope="session")
def login(stack):
    sessions: dict[str, Client] = {}

    def _login(username: str) -> Client:
        if username not in sessions:
            sessions[username] = Client(stack.gateway_url, username)
        return sessions[username]

    return _login


# Demo staff signed in once per session (see services/directory/demo.py).
@pytest.fixture(scope="session")
def admin(login):
    """Riverbend's agency admin."""
    return login("admin")


@pytest.fixture(scope="session")
def reyes(login):
    return login("dr.reyes")


@pytest.fixture(scope="session")
def kim(login):
    return login("nurse.kim")


@pytest.fixture(scope="session")
def chen(login):
    return login("dr.chen")


@pytest.fixture(scope="session")
def wilson(login):
    """A member of the intake team."""
    return login("intake.wilson")


@pytest.fixture(scope="session")
def outsider(login):
    """The admin of another agency (Lakeside)."""
    return login("lakeside.admin")


@pytest.fixture(scope="session")
def directory_target(stack) -> str:
    """directory's gRPC address in the stack."""
    return f"127.0.0.1:{stack.config.ports.directory_grpc}"


@pytest.fixture(scope="session")
def directory_channel(directory_target):
    channel = grpc.insecure_channel(directory_target)
    yield channel
    channel.close()


@pytest.fixture(scope="session")
def service_secret(stack):
    """A service client's development secret, as directory generated it into the stack's run folder."""

    def _secret(client_id: str) -> str:
        return (stack.run_dir / "secrets" / f"service-{client_id}.secret").read_text().strip()

    return _secret


@pytest.fixture(scope="session")
def inbox_stub(stack):
    """inbox's gRPC InboxService in the stack."""
    channel = grpc.insecure_channel(f"127.0.0.1:{stack.config.ports.inbox_grpc}")
    yield inbox_pb2_grpc.InboxServiceStub(channel)
    channel.close()


@pytest.fixture(scope="session")
def service_token(directory_target, service_secret):
    """A registered service client's agency-scoped token, issued by directory (client credentials)."""
    issued: list[ServiceTokens] = []

    def _token(client_id: str, agency_id: str = "agy_riverbend") -> str:
        tokens = ServiceTokens(directory_target, client_id, service_secret(client_id))
        issued.append(tokens)
        return tokens.token(agency_id)

    yield _token
    for tokens in issued:
        tokens.close()


def auth(token: str) -> list[tuple[str, str]]:
    """gRPC metadata carrying a bearer token."""
    return [("authorization", f"Bearer {token}")]


def wait_until(condition, timeout: float = 5.0, interval: float = 0.05):
    """Poll `condition` until it returns something truthy (returned); AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
