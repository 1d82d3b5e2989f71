"""The whole system started as `make run` starts it, on free ports, against the
session's embedded database and private RabbitMQ vhost."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pika
import pytest
import requests
from google.protobuf.message import Message

from clinic.audit.v1 import audit_pb2
from clinic.events.v1 import envelope_pb2
from clinic.inbox.v1 import inbox_pb2, inbox_pb2_grpc
from services.kit.events import decode_envelope, unpack
from services.kit.sealing import PayloadSealer
from services.kit.service_identity import ServiceTokens
from services.kit.settings import Env, common_settings
from services.kit.transport import open_channel
from services.launcher import Ports, Stack, StackConfig, free_port
from tests.helpers import DEMO_PASSWORD
from tests.waits import wait_until

# Where cloud-comms sends Direct MDNs in the e2e stack: the partner HISP sink of tests/e2e/test_cloud_direct.py.
CLOUD_SMTP_SINK_PORT = free_port()


@pytest.fixture(scope="session")
def stack(tmp_path_factory, mongo_uri, amqp_url):
    prefix = f"e2e{uuid.uuid4().hex[:6]}_"
    config = StackConfig(
        run_dir=tmp_path_factory.mktemp("run"),
        ports=Ports.free(),
        mongo_uri=mongo_uri,
        amqp_url=amqp_url,
        # The compliance pass every half second, so overdue items are reported within a test's wait.
        extra_env={
            "MONGO_DB_PREFIX": prefix,
            "PASSWORD_HASH_PROFILE": "fast",
            "NOTIFICATIONS_COMPLIANCE_PASS_S": "0.5",
            # Agency options and lab flags changed by a test apply within a second.
            "NOTIFICATIONS_RECIPIENTS_CACHE_S": "1",
            # erx-bridge: no scheduled sync (tests start every sync and count the vendor calls it
            # makes); ePrescribing flags apply within a second; a simulated vendor timeout is 2 s.
            "ERX_SYNC_INTERVAL_S": "0",
            "ERX_STAFF_CACHE_S": "1",
            "ERX_VENDOR_READ_TIMEOUT_S": "2",
            # cloud-comms: Direct MDNs to the test's SMTP sink, looked for every 0.2 s; directory's
            # address links apply within a second.
            "CLOUD_SMTP_RELAY": f"127.0.0.1:{CLOUD_SMTP_SINK_PORT}",
            "CLOUD_DIRECT_MDN_PASS_S": "0.2",
            "CLOUD_ADDRESS_CACHE_S": "1",
            # Deadlines (escalations, due dates, coverage windows, retention) follow a clock the
            # tests move forward: POST /internal/v1/test-clock on inbox's own port (services.kit.clock).
            "CLINIC_TEST_CLOCK": "1",
        },
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

    def counts(self, folder_id: str) -> tuple[int, int]:
        """A folder's (unread, total), as the tree shows them."""
        folder = self.folder(folder_id)
        return folder["unread"], folder["total"]

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


def signed_in_once(gateway_url: str) -> Callable[[str], Client]:
    """username -> that staff member's Client, signed in on first use and kept."""
    sessions: dict[str, Client] = {}

    def _login(username: str) -> Client:
        if username not in sessions:
            sessions[username] = Client(gateway_url, username)
        return sessions[username]

    return _login


@pytest.fixture(scope="session")
def login(stack):
    return signed_in_once(stack.gateway_url)


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


class ErxSimulator:
    """The stack's eRx vendor simulator, through its control API (services/erx_simulator)."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.http = requests.Session()

    def _json(self, method: str, path: str, **kwargs) -> dict:
        reply = self.http.request(method, f"{self.base_url}/simulator{path}", timeout=30, **kwargs)
        assert reply.status_code in (200, 201), reply.text
        return reply.json()

    def state(self) -> dict:
        return self._json("GET", "/state")

    def counts(self, clinician_id: str) -> dict[str, int]:
        """Open items per kind of one clinician."""
        found = self.state()["clinicians"][clinician_id]
        return {k: v for k, v in found.items() if k != "clinic_id"}

    def add(self, clinician_id: str, kind: str, count: int = 1, **fields) -> list[dict]:
        """New open items; each {kind, id, vendor_item_id, patient_id}."""
        return self._json("POST", f"/clinicians/{clinician_id}/items", json={"kind": kind, "count": count, **fields})[
            "items"
        ]

    def resolve(self, vendor_item_id: str) -> None:
        self._json("DELETE", f"/items/{vendor_item_id}")

    def calls(self) -> dict[str, dict[str, int]]:
        """endpoint -> clinician id -> calls answered since the last clear."""
        return self._json("GET", "/calls")["calls"]

    def clear_calls(self) -> None:
        self._json("DELETE", "/calls")

    def fault(self, **fault) -> None:
        self._json("POST", "/faults", json=fault)

    def clear_faults(self) -> None:
        self._json("DELETE", "/faults")

    def bulk(self, clinicians: int, items: int, first_clinician_id: int) -> list[str]:
        return self._json(
            "POST", "/bulk", json={"clinicians": clinicians, "items": items, "first_clinician_id": first_clinician_id}
        )["clinician_ids"]


@pytest.fixture(scope="session")
def erx_simulator(stack) -> ErxSimulator:
    """The eRx vendor simulator the stack started (development only)."""
    return ErxSimulator(stack.erx_simulator_url)


@pytest.fixture(scope="session")
def inbox_db(stack, mongo_client):
    """inbox's database in the stack, for checks of what was (or was not) written."""
    return mongo_client[f"{stack.db_prefix}inbox"]


@pytest.fixture(scope="session")
def certs(stack):
    """The stack's development Direct certificates (CA, agencies, the partner HISP)."""
    return stack.cloud_direct_certs


@pytest.fixture(scope="session")
def smtp_port(stack) -> int:
    """cloud-comms' Direct SMTP listener in the stack."""
    return stack.config.ports.cloud_comms_smtp


@pytest.fixture(scope="session")
def cloud_db(stack, mongo_client):
    """cloud-comms' database in the stack."""
    return mongo_client[f"{stack.db_prefix}cloud-comms"]


@pytest.fixture(scope="session")
def erx_db(stack, mongo_client):
    """erx-bridge's database in the stack."""
    return mongo_client[f"{stack.db_prefix}erx-bridge"]


@pytest.fixture(scope="session")
def directory_target(stack) -> str:
    """directory's gRPC address in the stack."""
    return f"127.0.0.1:{stack.config.ports.directory_grpc}"


def stack_channel(stack: Stack, target: str) -> grpc.Channel:
    """A channel to one of the stack's gRPC ports, with the stack's service certificate (mutual TLS),
    as the stack's own services open theirs."""
    return open_channel(target, tls=stack.grpc_tls)


@pytest.fixture(scope="session")
def directory_channel(stack, directory_target):
    channel = stack_channel(stack, directory_target)
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
    channel = stack_channel(stack, f"127.0.0.1:{stack.config.ports.inbox_grpc}")
    yield inbox_pb2_grpc.InboxServiceStub(channel)
    channel.close()


@pytest.fixture(scope="session")
def service_token(stack, directory_target, service_secret):
    """A registered service client's agency-scoped token, issued by directory (client credentials)."""
    issued: list[ServiceTokens] = []

    def _token(client_id: str, agency_id: str = "agy_riverbend") -> str:
        tokens = ServiceTokens(directory_target, client_id, service_secret(client_id), tls=stack.grpc_tls)
        issued.append(tokens)
        return tokens.token(agency_id)

    yield _token
    for tokens in issued:
        tokens.close()


def error_code(error: grpc.RpcError) -> str:
    """The stable error code a refused gRPC call carries in its trailing metadata."""
    return dict(error.trailing_metadata() or ()).get("error-code", "")


EVENTS_EXCHANGE = "clinic.events"
EVENT_PAYLOADS: dict[str, type[Message]] = {
    "announcement.posted.v1": inbox_pb2.AnnouncementPosted,
    "board_item.delivered.v1": inbox_pb2.BoardItemDelivered,
    "board_item.delivery_requested.v1": inbox_pb2.DeliverItemRequest,
    "message.delivered.v1": inbox_pb2.MessageDelivered,
    "phi.accessed.v1": audit_pb2.PhiAccessed,
}


@dataclass(frozen=True)
class Event:
    """One event seen on the bus: its envelope and its payload, unpacked by event type."""

    envelope: envelope_pb2.Envelope
    payload: Message

    @property
    def type(self) -> str:
        return self.envelope.event_type


class EventListener:
    """The events published with the listened-to routing keys since the listener's queue was bound."""

    def __init__(self, channel, queue: str, routing_keys: tuple[str, ...], sealer: PayloadSealer):
        self.channel = channel
        self.sealer = sealer
        self.queue = queue
        self.routing_keys = routing_keys
        self.received: list[Event] = []

    def drain(self) -> list[Event]:
        """Every event received so far, after taking in whatever is waiting on the queue now."""
        while True:
            method, _properties, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return list(self.received)
            envelope = decode_envelope(body)
            self.received.append(Event(envelope, unpack(envelope, EVENT_PAYLOADS[envelope.event_type], self.sealer)))

    def wait_for(self, predicate: Callable[[Event], object], timeout: float = 10.0) -> Event:
        """The first received event matching `predicate`; fails the test when none arrives within `timeout` s."""
        return wait_until(
            lambda: next((event for event in self.drain() if predicate(event)), None),
            timeout=timeout,
            message=f"a matching {'/'.join(self.routing_keys)} event",
        )


class EventBus:
    """The stack's event exchange, listened to from a test."""

    def __init__(self, amqp_url: str, run_dir: Path):
        self.amqp_url = amqp_url
        # The stack's master keys open the sealed payloads its producers publish (services.kit.sealing).
        common = common_settings(Env("e2e", {"CLINIC_RUN_DIR": str(run_dir)}))
        self.sealer = PayloadSealer(common.phi_master_keys, common.phi_master_key_id)

    @contextlib.contextmanager
    def listen(self, *routing_keys: str) -> Iterator[EventListener]:
        """An exclusive queue bound to `routing_keys`, removed when the block ends."""
        unknown = set(routing_keys) - set(EVENT_PAYLOADS)
        assert not unknown, f"no payload type known for {unknown}"
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            channel = connection.channel()
            queue = channel.queue_declare(queue="", exclusive=True).method.queue
            for routing_key in routing_keys:
                channel.queue_bind(queue, EVENTS_EXCHANGE, routing_key=routing_key)
            yield EventListener(channel, queue, routing_keys, self.sealer)
        finally:
            connection.close()


@pytest.fixture(scope="session")
def events(stack) -> EventBus:
    """Listen to the stack's events: `with events.listen("message.delivered.v1") as heard: heard.wait_for(...)`."""
    return EventBus(stack.config.amqp_url, stack.run_dir)


@pytest.fixture
def advance_clock(stack):
    """Move inbox's deadline clock forward by `minutes` and run its deadline passes at once
    (services.kit.clock); the answer names what each pass did. The clock never moves back, so a test
    that moves it puts its own deadlines after any earlier test's."""

    def _advance(minutes: float) -> dict:
        reply = requests.post(
            f"http://127.0.0.1:{stack.config.ports.inbox_http}/internal/v1/test-clock",
            json={"advance_ms": int(minutes * 60_000)},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        return reply.json()

    return _advance


@pytest.fixture(scope="session")
def fault_stack(tmp_path_factory, mongo_uri):
    """The stack the fault tests kill, restart and cut off (tests/e2e/test_faults_*.py), shared by
    them so it starts once: a private one (its own vhost, database prefix and processes), never the
    suite's `stack`. Its counter drift check runs every second and repairs a drift that stayed 10 s,
    so a crash's leftovers are found within a test's wait. Every fault test leaves every process
    running when it ends; test_faults_broker.py, which counts whole folders, runs first (file order)
    and the others count what they add."""
    from tests.e2e.fault_stack import private_stack

    with private_stack(
        tmp_path_factory.mktemp("faults"),
        mongo_uri,
        INBOX_COUNTER_CHECK_INTERVAL_S="1",
        INBOX_COUNTER_CHECK_CONFIRM_S="10",
    ) as stack:
        yield stack
