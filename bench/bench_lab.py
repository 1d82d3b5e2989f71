"""Lab results per second from ONE MLLP connection until they are on the boards, against the raw
broker publish rate measured in the same run.

- end to end: the whole system as `make run` starts it (nx-27017, the local RabbitMQ in a private
  vhost, directory, inbox, notifications, gateway). N ORU^R01 CBC panels, each a new order, are
  sent one after another on one connection with python-hl7's MLLPClient; each ACK (AA) comes after
  the result and its delivery request are stored. The clock stops when the last result's item is
  on a flagged staff member's board, as the gateway lists it (every result reaches 5 staff, so
  inbox writes 5 board items per result).
- stored: the same run's rate of ACKs alone (results durably stored in notifications).
- raw publish: pika BlockingConnection publishing N persistent messages of the same size to a
  durable queue, without confirms (the broker's ceiling here), and with a confirm per message
  (what one-at-a-time durable hand-over costs), in the same vhost.

Target: end to end >= 100 results/s. Results also go to artifacts/bench/lab.json.
"""

from __future__ import annotations

import os
import sys
import time
import uuid

import pika
from hl7.client import MLLPClient

from bench._env import machine, running_stack, write_report
from tests.e2e.conftest import Client
from tests.e2e.lab_messages import oru

RESULTS = 1000
WARMUP = 20
TARGET = 100.0


def messages(count: int, tag: str) -> list[str]:
    return [oru(control_id=f"B{tag}{i:06d}", patient=f"MRN-{tag}-{i:06d}") for i in range(count)]


def raw_publish(amqp_url: str, bodies: list[bytes], confirm: bool) -> float:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        queue = f"bench-lab-raw-{uuid.uuid4().hex[:6]}"
        channel.queue_declare(queue, durable=True)
        if confirm:
            channel.confirm_delivery()
        properties = pika.BasicProperties(delivery_mode=2, content_type="application/hl7-v2")
        started = time.perf_counter()
        for body in bodies:
            channel.basic_publish("", queue, body, properties)
        if not confirm:
            channel.queue_declare(queue, durable=True, passive=True)  # a round trip: everything was taken
        elapsed = time.perf_counter() - started
        channel.queue_delete(queue)
        return len(bodies) / elapsed
    finally:
        connection.close()


def on_board(client: Client, patient: str) -> bool:
    items = client.items(folder="lab", limit=5)["items"]
    return any(item.get("summary", "").startswith(f"Patient {patient}:") for item in items)


def end_to_end(stack, count: int, tag: str) -> dict:
    reader = Client(stack.gateway_url, "nurse.kim")
    batch = messages(count, tag)
    last_patient = f"MRN-{tag}-{count - 1:06d}"
    with MLLPClient("127.0.0.1", stack.config.ports.notifications_mllp) as client:
        started = time.perf_counter()
        for message in batch:
            ack = client.send_message(message)
            if b"MSA|AA|" not in ack:
                raise SystemExit(f"not accepted: {ack!r}")
        acked = time.perf_counter()
    deadline = time.monotonic() + 300
    # Polled every 0.1 s (at most that late): faster polling through the gateway would take CPU
    # from the delivery it is waiting for on this 2-core machine.
    while not on_board(reader, last_patient):
        if time.monotonic() > deadline:
            raise SystemExit("the last result did not reach the board within 300 s")
        time.sleep(0.1)
    done = time.perf_counter()
    return {
        "results": count,
        "stored_per_s": count / (acked - started),
        "end_to_end_per_s": count / (done - started),
        "ack_phase_s": acked - started,
        "drain_after_last_ack_s": done - acked,
    }


def main() -> int:
    load_before = os.getloadavg()[0]
    with running_stack("lab") as stack:
        end_to_end(stack, WARMUP, "W")  # tokens, keys and caches warm
        e2e = end_to_end(stack, RESULTS, "M")
        bodies = [m.encode() for m in messages(RESULTS, "R")]
        raw = max(raw_publish(stack.config.amqp_url, bodies, confirm=False) for _ in range(3))
        confirmed = raw_publish(stack.config.amqp_url, bodies, confirm=True)
    size = sum(len(b) for b in bodies) // len(bodies)
    print(f"{'path':52} {'per s':>10} {'vs raw':>8}")
    rows = [
        ("raw publish, no confirms (broker ceiling)", raw),
        ("raw publish, confirm per message", confirmed),
        ("MLLP -> stored, ACK each (one connection)", e2e["stored_per_s"]),
        ("MLLP -> on the boards (end to end)", e2e["end_to_end_per_s"]),
    ]
    for label, rate in rows:
        print(f"{label:52} {rate:>10,.0f} {rate / raw:>8.1%}")
    verdict = "meets" if e2e["end_to_end_per_s"] >= TARGET else "misses"
    print(
        f"{RESULTS} CBC results of ~{size} bytes, 5 recipients each; end to end {e2e['end_to_end_per_s']:.0f}/s "
        f"({verdict} the {TARGET:.0f}/s target); "
        f"boards caught up {e2e['drain_after_last_ack_s']:.1f}s after the last ACK"
    )
    load = (load_before, os.getloadavg()[0])
    print(f"machine load (1-minute average) before / after: {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} CPUs")
    path = write_report(
        "lab",
        {
            "machine": machine(),
            "load_average_before_after": load,
            "message_bytes": size,
            "raw_publish_per_s": raw,
            "raw_publish_confirmed_per_s": confirmed,
            **e2e,
            "ratio_end_to_end_vs_raw": e2e["end_to_end_per_s"] / raw,
            "target_per_s": TARGET,
        },
    )
    print(f"written to {path.relative_to(path.parents[2])}")
    return 0 if e2e["end_to_end_per_s"] >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
