"""What the fault tests share: a whole stack of their own (its own RabbitMQ vhost, its own database
prefix, its own processes), so a killed service or a dropped broker connection touches nothing
else; clients that retry as real ones do; and the observables that prove events flowed.

A client of this module retries like the page and the partners: after a 502/503/504, a refused or
broken connection or a timeout it sends the same request again with the same `Idempotency-Key`, so a
send the service stored before it failed to answer is answered, not stored twice.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import requests

from services.launcher import Ports, Stack, StackConfig
from tests.conftest import AMQP_BASE, delete_vhost, vhost_url
from tests.e2e.conftest import Client
from tests.e2e.lab_messages import oru
from tests.helpers import msa

RETRYABLE = (502, 503, 504)
LAB_STAFF = ("dr.reyes", "nurse.kim", "dr.chen", "np.brooks", "nurse.white")  # Riverbend's lab-flagged staff
AWAY_TEXT = "Out of the office today; for urgent matters call the front desk."


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=120).stdout


@contextlib.contextmanager
def private_vhost() -> Iterator[tuple[str, str]]:
    """(vhost, an administrator's AMQP URL into it); deleted afterwards, with the broker users a stack
    made on it."""
    vhost = f"clinic-faults-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        user = urllib.parse.urlsplit(AMQP_BASE).username or "guest"
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield vhost, vhost_url(vhost)
    finally:
        delete_vhost(vhost)


def close_broker_connections(vhost: str, reason: str = "fault test: connections dropped") -> None:
    """Close every connection of `vhost` (never another vhost's) from the broker's side."""
    assert vhost.startswith(("clinic-faults-", "clinic-bench-")), vhost
    rabbitmqctl("close_all_connections", "--vhost", vhost, reason)


@contextlib.contextmanager
def private_stack(run_dir: Path, mongo_uri: str | None, **extra_env: str) -> Iterator[Stack]:
    """The whole system on free ports in a vhost of its own; `mongo_uri` None runs its own nx-27017.
    The stack carries `vhost` and `db_prefix`."""
    prefix = f"flt{uuid.uuid4().hex[:6]}_"
    with private_vhost() as (vhost, amqp_url):
        stack = Stack(
            StackConfig(
                run_dir=run_dir,
                ports=Ports.free(),
                mongo_uri=mongo_uri,
                amqp_url=amqp_url,
                extra_env={"MONGO_DB_PREFIX": prefix, "PASSWORD_HASH_PROFILE": "fast", **extra_env},
                gateway_env={"DECK_RATE_LIMIT_MINUTE": "1000000"},
            )
        )
        stack.vhost = vhost
        stack.db_prefix = prefix
        try:
            stack.start()
            yield stack
        finally:
            stack.stop()


# --- clients that retry ------------------------------------------------------------------------------
def retrying(call, *, deadline_s: float = 60.0, pause_s: float = 0.2) -> tuple[requests.Response, int]:
    """(the first answer that is not a retryable failure, how many attempts it took). `call` is made
    again after a 502/503/504 (waiting its Retry-After, at most 2 s), a refused or broken connection or a
    timeout."""
    deadline = time.monotonic() + deadline_s
    attempts = 0
    while True:
        attempts += 1
        try:
            reply = call()
            if reply.status_code not in RETRYABLE:
                return reply, attempts
            wait = min(2.0, float(reply.headers.get("Retry-After") or pause_s))
            failure = f"HTTP {reply.status_code} {reply.text[:200]}"
        except (requests.ConnectionError, requests.Timeout) as exc:
            wait, failure = pause_s, type(exc).__name__
        if time.monotonic() + wait > deadline:
            raise AssertionError(f"still failing after {attempts} attempts in {deadline_s} s: {failure}")
        time.sleep(wait)


def send_once(client: Client, *, deadline_s: float = 60.0, **body) -> tuple[str, int]:
    """Send a message under one Idempotency-Key, retried until answered; (message id, attempts)."""
    key = uuid.uuid4().hex
    body.setdefault("body", "Fault test message")

    def post() -> requests.Response:
        return client.post("/api/v1/messages", json=body, headers={"Idempotency-Key": key}, timeout=30)

    reply, attempts = retrying(post, deadline_s=deadline_s)
    assert reply.status_code in (200, 201), reply.text
    return reply.json()["id"], attempts


def midday_zone() -> str:
    """A fixed-offset zone where it is about noon now, so the auto-reply's once-per-day period cannot
    end during a test."""
    offset = 12 - dt.datetime.now(dt.UTC).hour
    return "Etc/GMT" if offset == 0 else f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"


def go_away(client: Client) -> None:
    """Turn the staff member's Staff Auto-Reply on (until turned off)."""
    body = {"enabled": True, "message": AWAY_TEXT, "starts_at": None, "ends_at": None, "time_zone": midday_zone()}
    reply = client.put("/api/v1/auto-replies/me/staff", json=body)
    assert reply.status_code == 200, reply.text


def listed(client: Client, path: str, **params) -> list[dict]:
    """Every item of a listing, page after page."""
    found: list[dict] = []
    cursor = None
    while True:
        query = {**params, "limit": 100, **({"cursor": cursor} if cursor else {})}
        reply = client.get(path, params=query)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        found += body["items"]
        cursor = body.get("next_cursor")
        if not cursor:
            return found


# --- live updates through the page's event stream --------------------------------------------------------
class LiveStream:
    """The staff member's live event stream (`GET /app/events` through the gateway), read in a thread:
    every `board` event with the monotonic time it arrived. Proves web's consumer heard an event
    that inbox's relay published. Like the page, it opens the stream again whenever it ends (web or
    the gateway restarted); `connected` is set while a stream is open."""

    def __init__(self, client: Client):
        self.client = client
        self.events: list[tuple[float, str]] = []
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._response: requests.Response | None = None
        self._thread = threading.Thread(target=self._read, name="live-stream", daemon=True)

    def __enter__(self) -> LiveStream:
        self._thread.start()
        assert self.connected.wait(30), "the live event stream did not open"
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._response is not None:
            self._response.close()
        self._thread.join(10)

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                with self.client.get("/app/events", stream=True, timeout=(10, 60)) as response:
                    self._response = response
                    if response.status_code == 200:
                        self._take(response)
            except (requests.RequestException, AttributeError, ValueError):
                pass
            finally:
                self.connected.clear()
            if not self._stop.is_set():
                time.sleep(0.5)

    def _take(self, response: requests.Response) -> None:
        event = ""
        for line in response.iter_lines(decode_unicode=True):
            if self._stop.is_set():
                return
            if line == ": connected":
                self.connected.set()
            elif line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "board":
                self.events.append((time.monotonic(), json.loads(line.removeprefix("data: "))["folder"]))

    def board_events_since(self, since: float, folder: str) -> int:
        return sum(1 for at, changed in self.events if at >= since and changed == folder)


# --- lab results over MLLP ---------------------------------------------------------------------------------
def lab_results(tag: str, count: int) -> list[str]:
    """`count` ORU^R01 CBC results, each for its own patient `MRN-<tag>-<n>` (one new order each)."""
    return [oru(control_id=f"F{tag}{n:05d}", patient=f"MRN-{tag}-{n:05d}") for n in range(count)]


class MllpSender:
    """Sends results one after another over one MLLP connection, as a lab's interface engine does:
    a result not acknowledged (the connection broke or timed out) is sent again, on a new connection,
    until acknowledged. `acked` counts the results acknowledged AA so far, `ack_times` holds when
    (monotonic), `failed_attempts` the sends or connects that failed and were tried again."""

    def __init__(self, port: int, *, deadline_s: float = 120.0, pause_s: float = 0.0):
        self.port = port
        self.deadline_s = deadline_s
        self.pause_s = pause_s
        self.acked = 0
        self.ack_times: list[float] = []
        self.failed_attempts = 0

    def send_all(self, messages: list[str]) -> int:
        """Send every message until acknowledged; returns `failed_attempts`."""
        deadline = time.monotonic() + self.deadline_s
        sock: socket.socket | None = None
        index = 0
        try:
            while index < len(messages):
                if time.monotonic() > deadline:
                    raise AssertionError(f"{len(messages) - index} results not acknowledged in {self.deadline_s} s")
                try:
                    if sock is None:
                        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                    ack = self._exchange(sock, messages[index])
                except OSError:
                    if sock is not None:
                        sock.close()
                    sock = None
                    self.failed_attempts += 1
                    time.sleep(0.2)
                    continue
                code = msa(ack).code
                assert code == "AA", f"result {index} answered {code}: {ack!r}"
                index += 1
                self.acked = index
                self.ack_times.append(time.monotonic())
                if self.pause_s:
                    time.sleep(self.pause_s)
        finally:
            if sock is not None:
                sock.close()
        return self.failed_attempts

    @staticmethod
    def _exchange(sock: socket.socket, message: str) -> bytes:
        sock.sendall(b"\x0b" + message.encode() + b"\x1c\r")
        received = b""
        while not received.endswith(b"\x1c\r"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("the listener closed the connection")
            received += chunk
        return received


def lab_patients(client: Client) -> list[str]:
    """The patient of every lab item on `client`'s board (a summary starts "Patient <MRN>: ...")."""
    return [
        item.get("summary", "").split(":", 1)[0].removeprefix("Patient ")
        for item in listed(client, "/api/v1/board/items", folder="lab")
    ]
