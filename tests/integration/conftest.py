"""Integration helpers: polling, an inbox of its own per hypothesis example, and the event bus with
per-test exchange and queue names, cleaned up afterwards."""

from __future__ import annotations

import contextlib
import subprocess
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pika
import pika.exceptions
import pytest

from services.inbox.components import Components
from services.kit.bus import Consumer, Topology
from tests.integration.inbox_fixtures import (
    AgencyTable,
    inbox,  # noqa: F401 - a fixture for the inbox tests
    make_inbox,
)
from tests.waits import wait_until


@contextlib.contextmanager
def own_inbox(mongo_client, table: AgencyTable) -> Iterator[Components]:
    """An inbox on a database of its own, dropped afterwards. Each hypothesis example needs one:
    a function-scoped fixture would be shared by every example of the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    try:
        yield make_inbox(mongo_client[name], table)
    finally:
        mongo_client.drop_database(name)


@dataclass
class EventBusPlace:
    """One test's corner of the session vhost: its topology and the queues it declared."""

    amqp_url: str
    topology: Topology
    queues: list[str] = field(default_factory=list)

    def consumer(self, queue: str, routing_keys: list[str], handler, **options) -> Consumer:
        options.setdefault("retry_delay_ms", 50)
        options.setdefault("reconnect_delay_s", (0.1, 0.5))
        consumer = Consumer(self.amqp_url, queue, routing_keys, handler, topology=self.topology, **options)
        self.queues += [consumer.queue, consumer.retry_queue, consumer.parking_queue]
        return consumer

    def _channel(self):
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        return connection, connection.channel()

    def get(self, queue: str, timeout: float = 10.0):
        """The next message on `queue` as (properties, body), waiting up to `timeout`."""
        connection, channel = self._channel()
        try:

            def take():
                method, properties, body = channel.basic_get(queue, auto_ack=True)
                return (properties, body) if method is not None else None  # (None, None, None) is truthy

            return wait_until(take, timeout, 0.02, f"a message on {queue}")
        finally:
            connection.close()

    def message_count(self, queue: str) -> int:
        connection, channel = self._channel()
        try:
            return channel.queue_declare(queue, passive=True).method.message_count
        finally:
            connection.close()

    def publish_raw(self, routing_key: str, body: bytes) -> None:
        connection, channel = self._channel()
        try:
            channel.confirm_delivery()
            channel.basic_publish(self.topology.exchange_name, routing_key, body, mandatory=True)
        finally:
            connection.close()

    def close_connections_named(self, connection_name: str) -> int:
        """Force-close this test's broker connections with the given client-provided name."""
        vhost = urllib.parse.unquote(urllib.parse.urlsplit(self.amqp_url).path.lstrip("/"))
        listed = subprocess.run(
            ["rabbitmqctl", "-q", "--no-table-headers", "list_connections", "-p", vhost, "pid", "client_properties"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        closed = 0
        for line in listed.stdout.splitlines():
            pid, _, properties = line.partition("\t")
            if f'{{"connection_name","{connection_name}"}}' in properties:
                subprocess.run(
                    ["rabbitmqctl", "-q", "close_connection", pid, "test drop"],
                    check=True,
                    capture_output=True,
                    timeout=60,
                )
                closed += 1
        return closed

    def cleanup(self) -> None:
        connection, channel = self._channel()
        try:
            for queue in [*self.queues, self.topology.unrouted_name]:
                channel.queue_delete(queue)
            for exchange in (self.topology.exchange_name, self.topology.unrouted_name):
                channel.exchange_delete(exchange)
        except pika.exceptions.AMQPError:
            pass
        finally:
            if connection.is_open:
                connection.close()


@pytest.fixture
def event_bus(amqp_url, name_prefix):
    place = EventBusPlace(amqp_url, Topology(prefix=name_prefix))
    yield place
    place.cleanup()
