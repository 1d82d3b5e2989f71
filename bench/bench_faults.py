"""Faults: nothing lost, nothing doubled, counters exact and events flowing again within seconds when
services die (kill -9), the lab listener dies mid-burst, the broker drops every connection or cuts the
outbox relay's while it waits for confirms; then a soak of mixed traffic.

    python -m bench.bench_faults
    BENCH_FAULTS_SOAK_S=60 python -m bench.bench_faults          # a one-minute soak

The whole system as `make run` starts it (its own nx-27017, a private vhost, free ports). Its services
reach the broker through a TCP relay of the benchmark's own (a process of its own, forwarding bytes),
which can hold back the broker's answers on one named connection and then cut it: that is how the
outbox relay is caught waiting for confirms. What the stack publishes is watched from a durable queue
connected straight to the broker (the tap). Clients behave as the page and the partners do: every send
carries an Idempotency-Key and is sent again with it after a 502/503/504, a refused or broken
connection or a timeout.

1. sends: BENCH_FAULTS_SENDS (2,000) messages from 8 staff members to 4 colleagues (2 of them away,
   with Staff Auto-Reply on). During the burst inbox, notifications, auto-reply, directory, web,
   gateway, audit and nx-27017 are each killed in turn (SIGKILL of the process group) and restarted,
   and the broker closes every connection of the vhost once. After each fault a probe (a message to
   a colleague who is away, with their page open) gives time-to-recover: from the kill until the probe
   is answered, its delivery published, pushed to the open page and answered by the auto-reply.
   Baseline: 200 sends of the same senders before any fault, and one probe.
2. lab: BENCH_FAULTS_LAB (1,000) ORU^R01 results over MLLP, notifications killed a third of the way
   in; the lab's engine sends again what was not acknowledged. Baseline: 200 results with no fault.
3. republish: inbox's relay connection held (the broker's confirms do not reach it) while messages
   are published, then cut; the relay publishes them again and the consumers deduplicate.
4. soak: BENCH_FAULTS_SOAK_S (600) seconds at BENCH_FAULTS_SOAK_RATE (50) requests/s of mixed routes,
   open loop (latency counted from when a request was due): p50/p95/p99 per route, errors, and the
   resident memory of every process at start and end.

Figures: lost (an accepted send missing a board item, a delivery never published, an auto-reply never
sent, a lab result missing from a board), doubled (a send stored twice, a second auto-reply, a result
stored twice), drift (every board's counters against a recount of its items), time-to-recover.
Exit status 1 when anything was lost, doubled or drifted, a send failed, or a fault did not heal.
Results also go to artifacts/bench/faults.json.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pika
import pika.exceptions
import pymongo
import requests

from bench._env import machine, private_vhost, use_stack_keys, write_report
from clinic.inbox.v1 import inbox_pb2
from services.inbox import domain
from services.inbox.board import Board
from services.inbox.store import InboxStore
from services.kit.bus import Topology
from services.kit.crypto import KeyRing, PhiCipher
from services.kit.events import MalformedEvent, decode_envelope, unpack
from services.kit.settings import Env, common_settings
from services.launcher import Ports, Stack, StackConfig
from tests.e2e.conftest import Client
from tests.e2e.fault_stack import (
    LAB_STAFF,
    LiveStream,
    MllpSender,
    close_broker_connections,
    go_away,
    lab_results,
    rabbitmqctl,
    retrying,
)

SENDS = int(os.environ.get("BENCH_FAULTS_SENDS", "2000"))
LAB = int(os.environ.get("BENCH_FAULTS_LAB", "1000"))
SOAK_S = float(os.environ.get("BENCH_FAULTS_SOAK_S", "600"))
SOAK_RATE = float(os.environ.get("BENCH_FAULTS_SOAK_RATE", "50"))
BASELINE_SENDS = 200
BASELINE_LAB = 200
REPUBLISH_SENDS = 20
TARGET_AFTER_READY_S = 5.0  # events flow again within this of a replacement being ready (issue 19)
DEADLINE_S = 180.0  # a client gives up on one send after this
SETTLE_S = 300.0

FAULTS = ("inbox", "notifications", "auto-reply", "directory", "web", "gateway", "audit", "nx-27017", "broker")
AGENCY = "agy_riverbend"
SENDERS = (
    "admin",
    "dr.chen",
    "np.brooks",
    "therapist.patel",
    "therapist.johnson",
    "casemgr.garcia",
    "intake.wilson",
    "frontdesk.davis",
)
RECIPIENTS = ("nurse.kim", "dr.reyes", "therapist.nguyen", "peer.martin")
AWAY = ("nurse.kim", "dr.reyes", "therapist.hall", "casemgr.oconnor")
# Nothing but probes (and the republish phase) is sent to the probe targets, so the first live update
# after a probe is the probe's, and each (probe sender, target) pair earns exactly one auto-reply.
PROBE_TARGETS = ("therapist.hall", "casemgr.oconnor")
PROBE_SENDERS = (
    "compliance.ortiz",
    "intake.thompson",
    "frontdesk.lopez",
    "billing.lee",
    "nurse.white",
    "therapist.nguyen",
    "peer.martin",
)
OUTPATIENT_TEAM = "team_riverbend_outpatient"  # the probe targets and 4 colleagues (one inactive: not a recipient)
RELAY_CONNECTION = "inbox-outbox"  # inbox's outbox relay names its broker connection so


# --- the broker relay: every service's AMQP connection passes through it ------------------------------------
def _relay_broker(port: int, upstream: tuple[str, int], control) -> None:
    """Forward 127.0.0.1:`port` to the broker, a thread per direction and connection, until told "stop".
    ("hold", name): stop passing the broker's bytes to connections whose client named itself `name`
    (AMQP connection_name, read from its first bytes); ("cut", name): close those connections.
    Answers each command with how many connections it matched."""
    server = socket.create_server(("127.0.0.1", port))
    links: list[dict] = []
    held: set[bytes] = set()
    lock = threading.Lock()

    def close(link: dict) -> None:
        link["closed"] = True
        for sock in (link["client"], link["upstream"]):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def pump(link: dict, source: socket.socket, target: socket.socket, from_client: bool) -> None:
        try:
            while not link["closed"]:
                data = source.recv(65536)
                if not data:
                    break
                if from_client and len(link["head"]) < 4096:
                    link["head"] += data[:4096]
                while not from_client and any(name in link["head"] for name in held) and not link["closed"]:
                    time.sleep(0.01)  # held: the broker's answers (confirms) wait here
                target.sendall(data)
        except OSError:
            pass
        finally:
            close(link)

    def accept() -> None:
        while True:
            client, _ = server.accept()
            try:
                upstream_sock = socket.create_connection(upstream, timeout=10)
                upstream_sock.settimeout(None)
            except OSError:
                client.close()
                continue
            link = {"client": client, "upstream": upstream_sock, "head": b"", "closed": False}
            with lock:
                links[:] = [known for known in links if not known["closed"]] + [link]
            threading.Thread(target=pump, args=(link, client, upstream_sock, True), daemon=True).start()
            threading.Thread(target=pump, args=(link, upstream_sock, client, False), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    while True:
        command, name = control.recv()
        if command == "stop":
            return
        tag = name.encode()
        with lock:
            matching = [link for link in links if tag in link["head"] and not link["closed"]]
        if command == "hold":
            held.add(tag)
        elif command == "cut":
            for link in matching:
                close(link)
            held.discard(tag)
        control.send(len(matching))


class BrokerRelay:
    """The TCP relay between the stack and the broker, in a process of its own (the benchmark's
    client threads do not share its interpreter)."""

    def __init__(self, amqp_url: str):
        parts = urllib.parse.urlsplit(amqp_url)
        self.port = _free_port()
        self._control, child = multiprocessing.Pipe()
        self._process = multiprocessing.get_context("spawn").Process(
            target=_relay_broker, args=(self.port, (parts.hostname, parts.port or 5672), child), daemon=True
        )
        self._process.start()
        netloc = f"{parts.username}:{parts.password}@127.0.0.1:{self.port}"
        self.url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def command(self, command: str, name: str) -> int:
        self._control.send((command, name))
        return self._control.recv()

    def stop(self) -> None:
        self._control.send(("stop", ""))
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- the tap: what the stack publishes ---------------------------------------------------------------------
class EventTap:
    """Every message.delivered.v1 and board_item.delivered.v1 the stack publishes, from a durable queue
    of its own connected straight to the broker: when each event id was first seen and how many times
    it was published (a relay publishes again what was not confirmed; consumers deduplicate)."""

    ROUTING_KEYS = ("message.delivered.v1", "board_item.delivered.v1")

    def __init__(self, amqp_url: str):
        self.params = pika.URLParameters(amqp_url)
        self.queue = f"bench-faults.tap.{uuid.uuid4().hex[:6]}"
        self.first: dict[str, float] = {}
        self.published: collections.Counter[str] = collections.Counter()
        self.answers: dict[str, float] = {}  # message id -> when its auto-reply's delivery was first seen
        self.lab: list[float] = []  # first sight of each lab item delivery
        self.unreadable = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tap", daemon=True)
        connection = pika.BlockingConnection(self.params)
        channel = connection.channel()
        channel.queue_declare(self.queue, durable=True)
        for key in self.ROUTING_KEYS:
            channel.queue_bind(self.queue, Topology().exchange_name, routing_key=key)
        connection.close()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                connection = pika.BlockingConnection(self.params)
                channel = connection.channel()
                channel.basic_qos(prefetch_count=1000)
                for method, _properties, body in channel.consume(self.queue, inactivity_timeout=0.3):
                    if self._stop.is_set():
                        break
                    if method is None:
                        continue
                    self._record(body, method.redelivered)
                    channel.basic_ack(method.delivery_tag)
                connection.close()
            except pika.exceptions.AMQPError:
                time.sleep(0.3)  # the broker closed the connection (a fault): consume again

    def _record(self, body: bytes, redelivered: bool) -> None:
        now = time.monotonic()
        try:
            envelope = decode_envelope(body)
            if envelope.event_type == "message.delivered.v1":
                delivered = unpack(envelope, inbox_pb2.MessageDelivered)
                answer_to = delivered.in_reply_to if delivered.auto_reply else ""
                lab = False
            else:
                answer_to = ""
                lab = unpack(envelope, inbox_pb2.BoardItemDelivered).board_kind == "lab"
        except MalformedEvent:
            self.unreadable += 1
            return
        event_id = envelope.event_id
        with self._lock:
            if redelivered and event_id in self.first:
                return  # taken before a fault cut the tap's connection, not acknowledged: no new publish
            self.published[event_id] += 1
            if event_id in self.first:
                return
            self.first[event_id] = now
            if answer_to:
                self.answers.setdefault(answer_to, now)
            if lab:
                self.lab.append(now)

    def seen(self, event_id: str) -> float | None:
        with self._lock:
            return self.first.get(event_id)

    def lab_since(self, since: float) -> list[float]:
        with self._lock:
            return [at for at in self.lab if at >= since]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        try:
            connection = pika.BlockingConnection(self.params)
            connection.channel().queue_delete(self.queue)
            connection.close()
        except pika.exceptions.AMQPError:
            pass


# --- sends -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sent:
    message_id: str
    sender_id: str
    recipients: tuple[str, ...]
    subject: str
    latency_s: float
    attempts: int


@dataclass
class Ledger:
    """Every send a client was answered for (accepted), and every one it gave up on (failed)."""

    accepted: list[Sent] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (subject, why)
    lab_results: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, sent: Sent) -> None:
        with self.lock:
            self.accepted.append(sent)

    def fail(self, subject: str, why: str) -> None:
        with self.lock:
            self.failed.append((subject, why))


def send(client: Client, path: str, body: dict, ledger: Ledger) -> Sent | None:
    """POST a message under one Idempotency-Key, again after a retryable failure; recorded in `ledger`."""
    key = uuid.uuid4().hex
    subject = body.get("subject") or f"reply {key}"
    started = time.monotonic()

    def post():
        return client.post(path, json=body, headers={"Idempotency-Key": key}, timeout=30)

    try:
        reply, attempts = retrying(post, deadline_s=DEADLINE_S)
    except (AssertionError, requests.RequestException) as exc:
        ledger.fail(subject, f"{type(exc).__name__} {str(exc)[:200]}")
        return None
    if reply.status_code not in (200, 201):
        ledger.fail(subject, f"HTTP {reply.status_code} {reply.text[:160]}")
        return None
    answer = reply.json()
    sent = Sent(
        answer["id"], client.staff_id, tuple(answer["recipient_ids"]), subject, time.monotonic() - started, attempts
    )
    ledger.add(sent)
    return sent


class Burst:
    """Hands out the sends of a burst; while faults remain, senders may run at most half a step past
    the next fault's turn before that fault was inflicted (its replacement ready), so every fault lands
    in the middle of the traffic."""

    def __init__(self, total: int, faults: int):
        self.total = total
        self.faults = faults
        self.step = max(1, total // (faults + 1))
        self.issued = 0
        self.healed = 0
        self._cond = threading.Condition()

    def ticket(self) -> int | None:
        with self._cond:
            while True:
                if self.issued >= self.total:
                    return None
                gate = (self.healed + 1) * self.step + self.step // 2 if self.healed < self.faults else self.total
                if self.issued < gate:
                    self.issued += 1
                    return self.issued - 1
                self._cond.wait(0.5)

    def turn(self, k: int) -> int:
        return k * self.step

    def heal(self) -> None:
        with self._cond:
            self.healed += 1
            self._cond.notify_all()


def run_burst(
    clients: dict[str, Client], burst: Burst, tag: str, ledger: Ledger
) -> tuple[list[threading.Thread], list[Sent]]:
    """The senders' threads, started, and the list their accepted sends are appended to."""
    recipients = [clients[name].staff_id for name in RECIPIENTS]
    done: list[Sent] = []

    def sender(client: Client) -> None:
        while (n := burst.ticket()) is not None:
            body = {"to_staff_ids": [recipients[n % len(recipients)]], "subject": f"{tag} {n}", "body": "Bench"}
            sent = send(client, "/api/v1/messages", body, ledger)
            if sent is not None:
                done.append(sent)

    threads = [threading.Thread(target=sender, args=(clients[name],), daemon=True) for name in SENDERS]
    for thread in threads:
        thread.start()
    return threads, done


# --- faults and probes -------------------------------------------------------------------------------------
def wait_for(condition: Callable[[], object], timeout: float) -> float | None:
    """When (monotonic) `condition` first held, polled every 50 ms; None after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        time.sleep(0.05)
    return None


def inflict(stack: Stack, fault: str, vhost: str) -> tuple[float, float]:
    """Kill `fault` (SIGKILL of its process group, reaped) and start it again, or have the broker close
    every connection of the vhost; (when it struck, when the replacement was ready)."""
    struck = time.monotonic()
    if fault == "broker":
        close_broker_connections(vhost, "bench: every connection dropped")
    else:
        stack.kill(fault)
        stack.restart(fault, timeout_s=120)
    return struck, time.monotonic()


def probe(
    clients: dict[str, Client], tap: EventTap, live: dict[str, LiveStream], pair: tuple[str, str], ledger: Ledger
) -> dict:
    """A message to an away colleague, sent once their page's live stream is open again (it reopens by
    itself, as the page does, after web or the gateway restarted); when (monotonic) the stream was
    open, the probe answered, its delivery published, pushed to the page and answered by the
    auto-reply (None: not within the deadline)."""
    sender, target = clients[pair[0]], clients[pair[1]]
    started = time.monotonic()
    reopened = wait_for(live[pair[1]].connected.is_set, 120)
    body = {"to_staff_ids": [target.staff_id], "subject": f"Probe {uuid.uuid4().hex[:8]}", "body": "Probe"}
    sent_at = time.monotonic()
    sent = send(sender, "/api/v1/messages", body, ledger)
    marks = {"started": started, "stream": reopened, "answered": None, "published": None, "live": None}
    if sent is None:
        return {**marks, "auto_reply": None}
    marks["answered"] = time.monotonic()
    marks["attempts"] = sent.attempts
    event_id = f"{sent.message_id}-{target.staff_id}-delivered"
    marks["published"] = wait_for(lambda: tap.seen(event_id), 120)
    marks["live"] = wait_for(lambda: live[pair[1]].board_events_since(sent_at, "messages"), 120)
    marks["auto_reply"] = wait_for(lambda: tap.answers.get(sent.message_id), 120)
    return marks


MARKS = ("stream", "answered", "published", "live", "auto_reply")


def healed_at(observed: dict) -> float | None:
    marks = [observed.get(key) for key in MARKS]
    return None if None in marks else max(marks)


def revive_the_dead(stack: Stack) -> list[str]:
    """Services that died as a consequence of a fault (not the one killed), started again."""
    dead = [name for name, alive in stack.status().items() if not alive]
    for name in dead:
        stack.restart(name, timeout_s=120)
    return dead


def sends_phase(stack: Stack, clients: dict, tap: EventTap, live: dict, ledger: Ledger, tag: str) -> dict:
    pairs = iter(itertools.product(PROBE_SENDERS, PROBE_TARGETS))
    baseline_probe = probe(clients, tap, live, next(pairs), ledger)
    base = Burst(BASELINE_SENDS, 0)
    threads, baseline = run_burst(clients, base, f"Baseline {tag}", ledger)
    started = time.monotonic()
    for thread in threads:
        thread.join()
    baseline_s = time.monotonic() - started

    burst = Burst(SENDS, len(FAULTS))
    threads, faulted = run_burst(clients, burst, f"Burst {tag}", ledger)
    started = time.monotonic()
    faults = []
    for k, fault in enumerate(FAULTS, 1):
        while burst.issued < burst.turn(k) and any(thread.is_alive() for thread in threads):
            time.sleep(0.02)
        struck, ready = inflict(stack, fault, stack.vhost)
        burst.heal()  # the senders go on while the probe measures the recovery under their load
        observed = probe(clients, tap, live, next(pairs), ledger)
        died = revive_the_dead(stack)
        healed = healed_at(observed)
        faults.append(
            {
                "fault": fault,
                "at_send": burst.turn(k),
                "down_s": round(ready - struck, 2),
                "recover_s": None if healed is None else round(healed - struck, 2),
                "after_ready_s": None if healed is None else round(healed - ready, 2),
                **{f"{mark}_after_ready_s": since(observed.get(mark), ready) for mark in MARKS},
                "probe_attempts": observed.get("attempts"),
                "died_meanwhile": died,
            }
        )
    for thread in threads:
        thread.join()
    burst_s = time.monotonic() - started
    base_probe_s = healed_at(baseline_probe)
    return {
        "baseline": latency_summary([s.latency_s for s in baseline], baseline_s),
        "faulted": latency_summary([s.latency_s for s in faulted], burst_s),
        "retried_sends": sum(1 for s in faulted if s.attempts > 1),
        "baseline_probe_s": None if base_probe_s is None else round(base_probe_s - baseline_probe["started"], 2),
        "faults": faults,
    }


def since(mark: float | None, start: float) -> float | None:
    return None if mark is None else round(mark - start, 2)


def latency_summary(samples: list[float], elapsed_s: float) -> dict:
    if not samples:
        return {"n": 0}
    ms = sorted(s * 1000 for s in samples)
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p95_ms": round(percentile(ms, 0.95), 1),
        "p99_ms": round(percentile(ms, 0.99), 1),
        "max_ms": round(ms[-1], 1),
        "per_s": round(len(ms) / elapsed_s, 1) if elapsed_s else None,
    }


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# --- lab results ------------------------------------------------------------------------------------------
def lab_phase(stack: Stack, tap: EventTap, ledger: Ledger, tag: str) -> dict:
    port = stack.config.ports.notifications_mllp
    per_result = len(LAB_STAFF)

    started = time.monotonic()
    MllpSender(port, deadline_s=600).send_all(lab_results(f"B{tag}", BASELINE_LAB))
    ledger.lab_results += BASELINE_LAB
    done = wait_for(lambda: len(tap.lab_since(started)) >= BASELINE_LAB * per_result, SETTLE_S)
    baseline_rate = BASELINE_LAB / ((done or time.monotonic()) - started)

    engine = MllpSender(port, deadline_s=600)
    results = lab_results(f"F{tag}", LAB)
    ledger.lab_results += LAB
    worker = threading.Thread(target=engine.send_all, args=(results,), daemon=True)
    started = time.monotonic()
    worker.start()
    while engine.acked < LAB // 3 and worker.is_alive():
        time.sleep(0.02)
    acked_at_kill = engine.acked
    struck, ready = inflict(stack, "notifications", stack.vhost)
    worker.join()
    done = wait_for(lambda: len(tap.lab_since(started)) >= LAB * per_result, SETTLE_S)
    first_ack = next((at for at in engine.ack_times if at > ready), None)
    flowing = next(iter(sorted(tap.lab_since(ready))), None)
    return {
        "baseline_per_s": round(baseline_rate, 1),
        "faulted_per_s": round(LAB / ((done or time.monotonic()) - started), 1),
        "acked_at_kill": acked_at_kill,
        "failed_attempts": engine.failed_attempts,
        "down_s": round(ready - struck, 2),
        "first_ack_after_ready_s": None if first_ack is None else round(first_ack - ready, 2),
        "events_after_ready_s": None if flowing is None else round(flowing - ready, 2),
        "all_on_boards": done is not None,
    }


# --- the republish path -------------------------------------------------------------------------------------
def republish_phase(stack: Stack, relay: BrokerRelay, clients: dict, tap: EventTap, inbox_db, ledger: Ledger) -> dict:
    """Hold the broker's answers to inbox's relay, send, see the events published (unconfirmed), cut the
    connection: the relay must publish them again."""

    def send_some(count: int, label: str) -> list[Sent]:
        """`count` messages to a team (6 recipients each, the probe targets among them), 4 at a time."""

        def one(n: int) -> Sent | None:
            body = {"to_team_ids": [OUTPATIENT_TEAM], "subject": f"{label} {uuid.uuid4().hex[:8]}", "body": label}
            return send(clients[SENDERS[n % 2]], "/api/v1/messages", body, ledger)

        with ThreadPoolExecutor(max_workers=4) as pool:
            return [sent for sent in pool.map(one, range(count)) if sent is not None]

    def events_of(sends: list[Sent]) -> list[str]:
        return [f"{s.message_id}-{r}-delivered" for s in sends for r in s.recipients]

    # The relay opens its connection when it first has something to publish: make sure it has one.
    warm = events_of(send_some(1, "Warm"))
    wait_for(lambda: all(tap.seen(e) for e in warm), 60)
    held = relay.command("hold", RELAY_CONNECTION)
    sends = send_some(REPUBLISH_SENDS, "Held")
    event_ids = events_of(sends)
    # The relay published a batch and now waits for its confirms (up to 30 s): cut it off then.
    wait_for(lambda: any(tap.seen(e) for e in event_ids), 60)
    time.sleep(1.0)  # the rest of that batch reaches the broker; nothing more comes while it waits
    ids = [s.message_id for s in sends]
    staged = inbox_db.messages.count_documents({"_id": {"$in": ids}, "_outbox_at": {"$exists": True}})
    cut_at = time.monotonic()
    unconfirmed = [e for e in event_ids if tap.seen(e)]
    cut = relay.command("cut", RELAY_CONNECTION)
    again = wait_for(lambda: all(tap.published[e] >= 2 for e in unconfirmed), 120)
    settled = wait_for(
        lambda: inbox_db.messages.count_documents({"_id": {"$in": ids}, "_outbox_at": {"$exists": True}}) == 0, 120
    )
    log = (stack.logs / "inbox.log").read_text(errors="replace")
    return {
        "relay_connections_held": held,
        "relay_connections_cut": cut,
        "events": len(event_ids),
        "published_unconfirmed": len(unconfirmed),
        "messages_staged_at_cut": staged,
        "republished": sum(1 for e in unconfirmed if tap.published[e] >= 2),
        "republished_within_s": None if again is None else round(again - cut_at, 2),
        "outbox_empty_within_s": None if settled is None else round(settled - cut_at, 2),
        "never_published": sum(1 for e in event_ids if not tap.seen(e)),
        "relay_retry_warnings": log.count("outbox events not confirmed; will retry"),
    }


# --- the soak ----------------------------------------------------------------------------------------------
SOAK_ROUTES = (
    *["board tree"] * 4,
    *["board items"] * 4,
    *["message list"] * 3,
    *["send"] * 3,
    *["open message"] * 2,
    "reply",
    "announcements",
    "auto-reply settings",
    "lab result (MLLP)",
)


class SoakUser:
    def __init__(self, client: Client, colleagues: list[str]):
        self.client = client
        self.colleagues = [c for c in colleagues if c != client.staff_id]
        self.received: collections.deque[str] = collections.deque(maxlen=50)
        self.lock = threading.Lock()

    def some_message(self) -> str | None:
        with self.lock:
            return self.received[-1] if self.received else None


def soak_request(route: str, user: SoakUser, n: int, stack: Stack, ledger: Ledger, tag: str) -> bool:
    client = user.client
    if route in ("open message", "reply") and user.some_message() is None:
        route = "message list"
    if route == "board tree":
        return client.get("/api/v1/board", timeout=30).status_code == 200
    if route == "board items":
        return client.get("/api/v1/board/items", params={"limit": 20}, timeout=30).status_code == 200
    if route == "message list":
        reply = client.get("/api/v1/messages", params={"limit": 20}, timeout=30)
        if reply.status_code == 200:
            mine = [m["id"] for m in reply.json()["items"] if m["sender"]["id"] in user.colleagues]
            with user.lock:
                user.received.extend(reversed(mine))
        return reply.status_code == 200
    if route == "send":
        to = user.colleagues[n % len(user.colleagues)]
        body = {"to_staff_ids": [to], "subject": f"Soak {tag} {n}", "body": "Soak"}
        return send(client, "/api/v1/messages", body, ledger) is not None
    if route == "open message":
        return client.get(f"/api/v1/messages/{user.some_message()}", timeout=30).status_code == 200
    if route == "reply":
        path = f"/api/v1/messages/{user.some_message()}/reply"
        return send(client, path, {"body": f"Soak reply {tag} {n}"}, ledger) is not None
    if route == "announcements":
        return client.get("/api/v1/announcements", params={"limit": 20}, timeout=30).status_code == 200
    if route == "auto-reply settings":
        return client.get("/api/v1/auto-replies/me", timeout=30).status_code == 200
    with ledger.lock:
        ledger.lab_results += 1
    MllpSender(stack.config.ports.notifications_mllp, deadline_s=60).send_all(lab_results(f"S{tag}{n}", 1))
    return True


def soak_phase(stack: Stack, ledger: Ledger, tag: str) -> dict:
    clients = [Client(stack.gateway_url, name) for name in SENDERS]  # fresh tokens for the whole soak
    ids = [c.staff_id for c in clients]
    users = [SoakUser(c, ids) for c in clients]
    latencies: dict[str, list[float]] = collections.defaultdict(list)
    errors: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def one(route: str, user: SoakUser, n: int, due: float) -> None:
        try:
            ok = soak_request(route, user, n, stack, ledger, tag)
        except Exception:  # noqa: BLE001 - an error of the system under test is a figure, not a crash
            ok = False
        with lock:
            latencies[route].append(time.monotonic() - due)
            if not ok:
                errors[route] += 1

    rss_start = rss_mb(stack)
    interval = 1.0 / SOAK_RATE
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=48, thread_name_prefix="soak") as pool:
        for n in itertools.count():
            due = started + n * interval
            if due >= started + SOAK_S:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            route = SOAK_ROUTES[n % len(SOAK_ROUTES)]
            pool.submit(one, route, users[(n * 7 + n // len(SOAK_ROUTES)) % len(users)], n, due)
    elapsed = time.monotonic() - started
    rss_end = rss_mb(stack)
    total = sum(len(v) for v in latencies.values())
    return {
        "seconds": round(elapsed, 1),
        "requests": total,
        "per_s": round(total / elapsed, 1),
        "routes": {
            route: {**latency_summary(samples, elapsed), "errors": errors[route]}
            for route, samples in sorted(latencies.items())
        },
        "rss_mb": {name: [rss_start.get(name), rss_end.get(name)] for name in rss_start},
    }


def rss_mb(stack: Stack) -> dict[str, float]:
    """Resident memory (MB) of each service, summed over its process group."""
    groups = {stack.pid(name): name for name in (*stack.SERVICES, "nx-27017") if stack.pid(name)}
    totals: dict[str, float] = dict.fromkeys(groups.values(), 0.0)
    page = os.sysconf("SC_PAGE_SIZE")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = groups.get(int(fields[2]))  # process group
        if name is not None:
            totals[name] += int(fields[21]) * page / 2**20
    return {name: round(mb, 1) for name, mb in totals.items()}


# --- checks: lost, doubled, drift ----------------------------------------------------------------------------
def chunks(items: list, size: int = 500) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def settle(tap: EventTap, ledger: Ledger, auto_reply_db) -> float | None:
    """Wait until every accepted send's deliveries were published and handled by auto-reply."""
    event_ids = [f"{s.message_id}-{r}-delivered" for s in ledger.accepted for r in s.recipients]
    started = time.monotonic()

    def handled() -> bool:
        if not all(tap.seen(e) for e in event_ids):
            return False
        keys = [f"auto-reply:{e}" for e in event_ids]
        found = sum(auto_reply_db.processed_events.count_documents({"_id": {"$in": chunk}}) for chunk in chunks(keys))
        return found == len(keys)

    done = wait_for(handled, SETTLE_S)
    return None if done is None else round(done - started, 1)


def check(stack: Stack, dbs: dict, tap: EventTap, ledger: Ledger, clients: dict, cipher: PhiCipher) -> dict:
    inbox_db = dbs["inbox"]
    accepted = {s.message_id: s for s in ledger.accepted}
    wanted: dict[str, str] = {}
    for s in accepted.values():
        for recipient in s.recipients:
            wanted[domain.board_item_id(s.message_id, recipient, domain.FOLDER_MESSAGES)] = s.message_id
        wanted[domain.board_item_id(s.message_id, s.sender_id, domain.FOLDER_SENT)] = s.message_id
    found: set[str] = set()
    for chunk in chunks(list(wanted)):
        found |= {doc["_id"] for doc in inbox_db.board_items.find({"_id": {"$in": chunk}}, {"_id": 1})}
    missing = [item for item in wanted if item not in found]

    senders = sorted({s.sender_id for s in accepted.values()})
    by_subject = {s.subject for s in accepted.values()}
    doubled = phantom = 0
    for doc in inbox_db.messages.find(
        {"sender_id": {"$in": senders}, "auto_reply": {"$eq": 0}}, {"_id": 1, "agency_id": 1, "subject": 1}
    ):
        if doc["_id"] in accepted:
            continue
        subject = cipher.open(doc["agency_id"], doc["_id"], "subject", doc["subject"])
        if subject in by_subject:
            doubled += 1  # a second message for a send the client was answered for
        else:
            phantom += 1  # stored although the client was told the send failed

    never_published = sum(
        1 for s in accepted.values() for r in s.recipients if not tap.seen(f"{s.message_id}-{r}-delivered")
    )
    republished = sum(1 for count in tap.published.values() if count > 1)

    away = {clients[name].staff_id for name in AWAY}
    expected = {(r, s.sender_id) for s in accepted.values() for r in s.recipients if r in away}
    answers = collections.Counter(
        (doc["sender_id"], doc["recipient_ids"][0])
        for doc in inbox_db.messages.find({"auto_reply": {"$eq": 1}}, {"sender_id": 1, "recipient_ids": 1})
    )

    lab_boards = {
        name: inbox_db.board_items.count_documents(
            {"board": {"$eq": domain.owner_folder(AGENCY, clients[name].staff_id, domain.FOLDER_LAB)}}
        )
        for name in LAB_STAFF
    }
    stored_results = dbs["notifications"].lab_results.count_documents({})

    store = InboxStore(inbox_db)
    board = Board(store, None)
    drifted = {}
    for doc in store.counters.find({}, {"_id": 1}):
        agency_id, staff_id = doc["_id"].split("|", 1)
        recounted = board.recount(agency_id, staff_id)
        drift = domain.add_deltas(board.stored_counts(agency_id, staff_id), {k: -v for k, v in recounted.items()})
        if drift:
            drifted[doc["_id"]] = drift
    return {
        "accepted_sends": len(accepted),
        "failed_sends": len(ledger.failed),
        "failures": collections.Counter(" ".join(why.split(" ", 2)[:2]) for _, why in ledger.failed),
        "lost_sends": len({wanted[item] for item in missing}),
        "missing_items": len(missing),
        "doubled_sends": doubled,
        "stored_though_failed": phantom,
        "deliveries_never_published": never_published,
        "events_published_more_than_once": republished,
        "auto_replies_expected": len(expected),
        "auto_replies_lost": len(expected - answers.keys()),
        "auto_replies_doubled": sum(count - 1 for count in answers.values() if count > 1),
        "auto_replies_unexpected": len(answers.keys() - expected),
        "lab_results_sent": ledger.lab_results,
        "lab_results_stored": stored_results,
        "lab_items_per_board": lab_boards,
        "lab_lost": sum(max(0, ledger.lab_results - count) for count in lab_boards.values()),
        "lab_doubled": sum(max(0, count - ledger.lab_results) for count in lab_boards.values())
        + max(0, stored_results - ledger.lab_results),
        "boards_checked": store.counters.estimated_document_count(),
        "boards_drifted": len(drifted),
        "drift": drifted,
        "parked_events": parked(stack.vhost),
    }


def parked(vhost: str) -> dict[str, int]:
    out = rabbitmqctl("list_queues", "-p", vhost, "--no-table-headers", "name", "messages")
    rows = (line.split() for line in out.splitlines() if line.strip())
    return {name: int(count) for name, count in rows if name.endswith(".parking") and int(count)}


def bad(checked: dict) -> list[str]:
    keys = (
        "failed_sends",
        "lost_sends",
        "doubled_sends",
        "stored_though_failed",
        "deliveries_never_published",
        "auto_replies_lost",
        "auto_replies_doubled",
        "lab_lost",
        "lab_doubled",
        "boards_drifted",
    )
    found = [f"{key} {checked[key]}" for key in keys if checked[key]]
    if checked["parked_events"]:
        found.append(f"parked {checked['parked_events']}")
    return found


# --- the run -----------------------------------------------------------------------------------------------
def service_db(stack: Stack, service: str):
    settings = common_settings(Env(service, stack.service_env()))
    return pymongo.MongoClient(settings.mongo_uri)[settings.mongo_db], settings


def main() -> int:
    begun = time.monotonic()
    load_before = os.getloadavg()[0]
    tag = uuid.uuid4().hex[:6]
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp, private_vhost() as amqp_url:
        relay = BrokerRelay(amqp_url)
        stack = Stack(
            StackConfig(
                run_dir=Path(tmp),
                ports=Ports.free(),
                amqp_url=relay.url,
                extra_env={"PASSWORD_HASH_PROFILE": "fast"},
                gateway_env={"DECK_RATE_LIMIT_MINUTE": "1000000"},
            )
        )
        stack.vhost = urllib.parse.unquote(urllib.parse.urlsplit(amqp_url).path[1:])
        tap = None
        try:
            stack.start()
            use_stack_keys(stack)
            tap = EventTap(amqp_url)
            report = run(stack, relay, tap, tag)
        finally:
            if tap is not None:
                tap.close()
            stack.stop()
            relay.stop()
    report["wall_s"] = round(time.monotonic() - begun, 1)
    report["load_average_before_after"] = (load_before, os.getloadavg()[0])
    report["machine"] = machine()
    problems = bad(report["checks"]) + [
        f"{f['fault']} did not heal" for f in report["sends"]["faults"] if f["recover_s"] is None
    ]
    rep = report["republish"]
    if not rep["published_unconfirmed"] or rep["republished"] < rep["published_unconfirmed"]:
        problems.append("the relay did not publish the unconfirmed events again")
    print_report(report, problems)
    path = write_report("faults", report)
    print(f"written to {path.relative_to(path.parents[2])}")
    return 1 if problems else 0


def run(stack: Stack, relay: BrokerRelay, tap: EventTap, tag: str) -> dict:
    names = {*SENDERS, *RECIPIENTS, *AWAY, *PROBE_SENDERS, *LAB_STAFF}
    clients = {name: Client(stack.gateway_url, name) for name in sorted(names)}
    for name in AWAY:
        go_away(clients[name])
    inbox_db, inbox_settings = service_db(stack, "inbox")
    dbs = {"inbox": inbox_db, "notifications": service_db(stack, "notifications")[0]}
    auto_reply_db = service_db(stack, "auto-reply")[0]
    cipher = PhiCipher(KeyRing(inbox_db, inbox_settings.phi_master_keys, inbox_settings.phi_master_key_id))
    ledger = Ledger()
    report: dict = {"sizes": {"sends": SENDS, "lab": LAB, "soak_s": SOAK_S, "soak_rate": SOAK_RATE}}
    with LiveStream(clients[PROBE_TARGETS[0]]) as first, LiveStream(clients[PROBE_TARGETS[1]]) as second:
        live = {PROBE_TARGETS[0]: first, PROBE_TARGETS[1]: second}
        report["sends"] = sends_phase(stack, clients, tap, live, ledger, tag)
    report["lab"] = lab_phase(stack, tap, ledger, tag)
    report["republish"] = republish_phase(stack, relay, clients, tap, inbox_db, ledger)
    report["settled_after_faults_s"] = settle(tap, ledger, auto_reply_db)
    report["checks_after_faults"] = check(stack, dbs, tap, ledger, clients, cipher)
    print_checks("after the faults", report["checks_after_faults"])
    report["soak"] = soak_phase(stack, ledger, tag)
    report["settled_after_soak_s"] = settle(tap, ledger, auto_reply_db)
    wait_for(lambda: dbs["notifications"].lab_results.count_documents({}) >= ledger.lab_results, 60)
    report["checks"] = check(stack, dbs, tap, ledger, clients, cipher)
    report["unreadable_events"] = tap.unreadable
    return report


# --- output ------------------------------------------------------------------------------------------------
def fmt(value, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def print_checks(when: str, c: dict) -> None:
    print(f"checks {when}:")
    print(
        f"  sends accepted {c['accepted_sends']}, failed {c['failed_sends']} {dict(c['failures'])}; "
        f"lost {c['lost_sends']} ({c['missing_items']} board items missing), doubled {c['doubled_sends']}, "
        f"stored though refused {c['stored_though_failed']}"
    )
    print(
        f"  deliveries never published {c['deliveries_never_published']}; events published more than once "
        f"{c['events_published_more_than_once']} (consumers deduplicate)"
    )
    print(
        f"  auto-replies expected {c['auto_replies_expected']}: lost {c['auto_replies_lost']}, "
        f"doubled {c['auto_replies_doubled']}, unexpected {c['auto_replies_unexpected']}"
    )
    print(
        f"  lab results sent {c['lab_results_sent']}, stored {c['lab_results_stored']}; lost {c['lab_lost']}, "
        f"doubled {c['lab_doubled']} (items per board {sorted(set(c['lab_items_per_board'].values()))})"
    )
    print(
        f"  counters: {c['boards_drifted']} of {c['boards_checked']} boards drift from a recount"
        + (f" {c['drift']}" if c["drift"] else "")
        + f"; parked events {c['parked_events'] or 0}",
        flush=True,
    )


def print_report(report: dict, problems: list[str]) -> None:
    sizes, sends, lab, rep, soak = (report[k] for k in ("sizes", "sends", "lab", "republish", "soak"))
    print(
        f"\nFaults benchmark: {sizes['sends']:,} sends, {sizes['lab']:,} lab results, "
        f"{sizes['soak_s']:.0f} s soak at {sizes['soak_rate']:.0f} req/s; {report['wall_s']} s wall"
    )
    print(f"  {'sends (8 clients)':<30}{'n':>6}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}{'per s':>8}")
    for label, row in (("baseline (no fault)", sends["baseline"]), ("with 9 faults", sends["faulted"])):
        print(
            f"  {label:<30}{row['n']:>6}{row['p50_ms']:>9}{row['p95_ms']:>9}{row['p99_ms']:>9}"
            f"{row['max_ms']:>9}{row['per_s']:>8}"
        )
    ratio = sends["faulted"]["p50_ms"] / sends["baseline"]["p50_ms"]
    print(
        f"  send p50 with / without faults: {ratio:.2f}; {sends['retried_sends']} sends retried with their key; "
        f"probe round trip with no fault {fmt(sends['baseline_probe_s'], ' s')}"
    )
    head = f"{'sent':>6}{'published':>11}{'live':>6}{'auto':>6}"
    print(f"  {'fault':<14}{'down s':>8}{'recover s':>11}   after ready s: {head}")
    for f in sends["faults"]:
        after = [fmt(f[f"{mark}_after_ready_s"]) for mark in ("answered", "published", "live", "auto_reply")]
        print(
            f"  {f['fault']:<14}{f['down_s']:>8}{fmt(f['recover_s']):>11}{'':>17}{after[0]:>6}{after[1]:>11}"
            f"{after[2]:>6}{after[3]:>6}"
            + (f"  died meanwhile: {','.join(f['died_meanwhile'])}" if f["died_meanwhile"] else "")
        )
    print(
        "  (down: kill to replacement ready; recover: kill to a probe to an away colleague, sent once their page's"
        " stream was open again, answered, its delivery published, pushed to the page and auto-answered;"
        f" target for published: <= {TARGET_AFTER_READY_S:.0f} s after ready)"
    )
    print(
        f"  lab over MLLP: {lab['baseline_per_s']}/s with no fault, {lab['faulted_per_s']}/s with notifications "
        f"killed after {lab['acked_at_kill']} ACKs (ratio {lab['faulted_per_s'] / lab['baseline_per_s']:.2f}); "
        f"down {lab['down_s']} s, first ACK {fmt(lab['first_ack_after_ready_s'])} s and deliveries "
        f"{fmt(lab['events_after_ready_s'])} s after ready; {lab['failed_attempts']} failed attempts sent again"
    )
    print(
        f"  republish: confirms held on {rep['relay_connections_held']} relay connection; "
        f"{rep['published_unconfirmed']} of {rep['events']} events published unconfirmed "
        f"({rep['messages_staged_at_cut']} messages still staged), connection cut: {rep['republished']} "
        f"published again within {fmt(rep['republished_within_s'])} s, "
        f"outbox empty within {fmt(rep['outbox_empty_within_s'])} s, {rep['never_published']} never published"
    )
    print(f"  soak: {soak['requests']} requests in {soak['seconds']} s ({soak['per_s']}/s), open loop")
    print(f"  {'route':<24}{'n':>6}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>8}")
    for route, row in soak["routes"].items():
        print(
            f"  {route:<24}{row['n']:>6}{row['p50_ms']:>9}{row['p95_ms']:>9}{row['p99_ms']:>9}"
            f"{row['max_ms']:>9}{row['errors']:>8}"
        )
    print("  RSS MB start -> end: " + ", ".join(f"{n} {a}->{b}" for n, (a, b) in soak["rss_mb"].items()))
    print_checks("at the end", report["checks"])
    load = report["load_average_before_after"]
    print(f"  machine load (1-minute average) before / after: {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} CPUs")
    print("  " + ("PROBLEMS: " + "; ".join(problems) if problems else "nothing lost, doubled or drifted"))


if __name__ == "__main__":
    sys.exit(main())
