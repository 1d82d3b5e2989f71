"""Per-instance consumer queues: `queue_expires_ms` lets the broker delete them once the instance is gone."""

from __future__ import annotations

import subprocess
import time
import urllib.parse

import pytest

from services.kit.bus import Consumer
from tests.waits import wait_until


def list_queues(amqp_url: str) -> dict[str, str]:
    """Queue name -> its declared arguments, as rabbitmqctl shows them (listing does not count as a use,
    whereas a passive declare would restart the expiry clock)."""
    vhost = urllib.parse.unquote(urllib.parse.urlsplit(amqp_url).path.lstrip("/"))
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "--no-table-headers", "list_queues", "-p", vhost, "name", "arguments"],
        check=True, capture_output=True, text=True, timeout=60,
    )
    return dict(line.split("\t", 1) for line in listed.stdout.splitlines() if "\t" in line)


def test_all_three_queues_expire_once_the_consumer_is_gone(event_bus):
    consumer = event_bus.consumer("instance-a", ["session.revoked.v1"], lambda _: None, queue_expires_ms=1000)
    queues = [consumer.queue, consumer.retry_queue, consumer.parking_queue]
    with consumer.running():
        declared = list_queues(event_bus.amqp_url)
        assert all("x-expires" in declared[q] and "1000" in declared[q] for q in queues), declared
        # All three stay however long the instance runs: the consumed queue because it is in use,
        # retry and parking (nothing consumes them) because the consumer keeps redeclaring them.
        # Waiting past the expiry is the point here, not synchronisation.
        time.sleep(1.5)
        assert set(queues) <= set(list_queues(event_bus.amqp_url))
    wait_until(lambda: not set(queues) & set(list_queues(event_bus.amqp_url)), timeout=20, interval=0.5)


def test_without_expiry_the_queues_outlive_the_consumer(event_bus):
    consumer = event_bus.consumer("durable-b", ["session.revoked.v1"], lambda _: None)
    with consumer.running():
        pass
    declared = list_queues(event_bus.amqp_url)
    for queue in (consumer.queue, consumer.retry_queue, consumer.parking_queue):
        assert queue in declared and "x-expires" not in declared[queue]


def test_expiry_must_be_positive(amqp_url):
    with pytest.raises(ValueError, match="positive"):
        Consumer(amqp_url, "q", ["a.b.v1"], lambda _: None, queue_expires_ms=0)
