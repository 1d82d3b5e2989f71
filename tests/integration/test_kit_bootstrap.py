"""The kit's service bootstrap against the real database and broker: one stop order for every
service (intake, then workers, then the relay, then clients), and an event a worker stages as it
stops is still published before the process is gone."""

from __future__ import annotations

import socket
import threading
import uuid
from types import SimpleNamespace

import pytest
from flask import Flask

from clinic.inbox.v1.inbox_pb2 import MessageDelivered
from services.kit.bootstrap import ServiceWiring, Stage
from services.kit.events import new_envelope
from services.kit.outbox import outbox_fields
from tests.waits import wait_until

DELIVERED = "message.delivered.v1"
ITEMS = "items"


def settings_for(mongo_uri: str, db_name: str, amqp_url: str, exchange: str) -> SimpleNamespace:
    common = SimpleNamespace(
        # A client of its own (kit mongo keeps one per URI): the stopping service closes it.
        mongo_uri=f"{mongo_uri}?appname=bootstrap-{uuid.uuid4().hex[:8]}",
        mongo_db=db_name,
        amqp_url=amqp_url,
        events_exchange=exchange,
        log_level="INFO",
        http_host="127.0.0.1",
        grpc_host="127.0.0.1",
        phi_master_keys={"k1": b"k" * 32},
        phi_master_key_id="k1",
    )
    return SimpleNamespace(common=common, directory_grpc_target="127.0.0.1:1")


class Recorder:
    def __init__(self):
        self.steps: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, step: str) -> None:
        with self._lock:
            self.steps.append(step)


class Client:
    def __init__(self, name: str, record: Recorder):
        self.name, self.record = name, record

    def close(self) -> None:
        self.record(f"{self.name} closed")


@pytest.fixture
def sink(event_bus):
    received: list[str] = []
    consumer = event_bus.consumer("bootstrap-sink", [DELIVERED], lambda envelope: received.append(envelope.event_id))
    with consumer.running():
        yield received


def test_a_service_stops_intake_then_workers_then_relay_then_clients(
    mongo_uri, mongo_client, db_name, event_bus, sink
):
    record = Recorder()
    exchange = event_bus.topology.exchange_name
    service = ServiceWiring("bootstrap-test", settings_for(mongo_uri, db_name, event_bus.amqp_url, exchange))
    db = service.database()
    service.client("directory-client", Client("directory client", record))
    service.client("service-tokens", Client("service tokens", record))
    relay = service.relay([ITEMS], lease_ttl_s=None, poll_interval_s=30.0)  # idle: only the drain publishes
    relaying = relay.run_forever

    def run_forever(stop: threading.Event, **options) -> None:
        relaying(stop, **options)
        record("relay stopped")

    relay.run_forever = run_forever  # type: ignore[method-assign]
    payload = MessageDelivered(message_id=uuid.uuid4().hex)
    last_event = new_envelope(DELIVERED, payload, agency_id="agy_a", producer="inbox")  # signed as inbox

    def listener(stop: threading.Event) -> None:
        stop.wait()
        record("listener stopped")

    def worker(stop: threading.Event) -> None:
        stop.wait()
        # Work finishing as the process stops still stages its event; the relay runs after it.
        db[ITEMS].insert_one({"_id": uuid.uuid4().hex, **outbox_fields([last_event])})
        record("worker stopped")

    service.worker("finishing-work", worker)
    service.listener("intake", listener, stop=lambda: record("intake told to stop"))
    service.on_stop("hook", lambda: record("intake hook"))
    service.start()
    service.stop()

    # Within the intake stage the stop hooks and the listener's return may interleave.
    assert set(record.steps[:3]) == {"intake hook", "intake told to stop", "listener stopped"}
    assert record.steps.index("intake hook") < record.steps.index("intake told to stop")
    assert record.steps[3:] == [
        "worker stopped",
        "relay stopped",
        "service tokens closed",
        "directory client closed",
    ]
    assert mongo_client[db_name][ITEMS].find_one({"_outbox_at": {"$exists": True}}) is None  # none left staged
    wait_until(lambda: last_event.event_id in sink)


def test_a_listener_is_waited_for_before_serving_and_a_failed_start_stops_what_runs(mongo_uri, db_name, amqp_url):
    record = Recorder()
    service = ServiceWiring("bootstrap-test", settings_for(mongo_uri, db_name, amqp_url, "unused"))
    ready = threading.Event()

    def listener(stop: threading.Event) -> None:
        ready.set()
        stop.wait()
        record("listener stopped")

    def worker(stop: threading.Event) -> None:
        stop.wait()
        record("worker stopped")

    app = Flask("bootstrap-test")
    app.before_request(lambda: record("never served"))
    service.worker("work", worker)
    service.listener("intake", listener, ready=lambda timeout: ready.wait(timeout) and record("listener ready") is None)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        service.http(app, taken.getsockname()[1])  # the port is in use: the server cannot start
        with pytest.raises(OSError):
            service.start()
    assert record.steps == ["listener ready", "listener stopped", "worker stopped"]
    assert service.process.stop_event.is_set()


def test_stages_are_in_stop_order():
    assert list(Stage) == [Stage.INTAKE, Stage.WORKERS, Stage.RELAY, Stage.CLIENTS]
