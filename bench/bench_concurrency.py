"""Concurrency benchmark: N staff working at once, everything on this machine, N ramped until the
system misses its latency target; the largest N that meets it is the knee.

    python -m bench.bench_concurrency [--ramp 100,250,500,750,1000,1250] [--speed 1] [--step-s 60]
                                      [--no-baseline] [--profile] [--profile-s 30]

Starts its own stack (embedded nx-27017, a private RabbitMQ vhost, free ports) with every service's
defaults; only the sign-in and the gateway's rate limits are raised so that one client may act for a
thousand staff. max(ramp) staff members are created in the demo agency (Riverbend) through
directory's API. One asyncio loop in this process (bench/_load.py) is every staff member's browser.

The load model, per staff member online (the clinician's working pattern, `--speed` times faster):
- one open page: its live event stream (`GET /app/events` through the gateway), kept open;
- the board every 60 s: the folder tree and the first page of the messages folder;
- an item opened every 30 s (one of the items the last page showed);
- a message every 3 minutes to a colleague who also has the page open;
- lab results over MLLP (one connection, as a lab interface has) at 1 per staff member per hour;
- the page's activity report every 30 s (`POST /api/v1/auth/activity`: keeps the session from the
  idle sign-out) and its token refreshed (`/api/v1/auth/refresh`) before it expires.
Staff sign in when they join (open the page).
Arrivals are random (Poisson) at those rates, open loop: a slow answer does not slow the offered
load, so queueing shows up as latency. `--speed` multiplies every rate alike (the same ratios); a
run at speed s with N staff offers the load of N x s staff ("staff-equivalent"), so the knee is
reported both ways. At each step the new staff join (stream opened, board loaded), the load runs
`--warmup-s` unrecorded, then `--step-s` recorded.

Reported per step: p50/p95/p99 by route and errors (HTTP >= 400, failed connections, MLLP
rejections, deliveries not seen within 30 s); live delivery (from the send until the recipient's
stream says its messages folder changed; a recipient has at most one message in flight, so every
event is matched to its send); CPU (% of one core) and RSS of every process of the stack, of
nx-27017, of the RabbitMQ node (shared by everything on this machine) and of this load generator
(psutil, children included); the gateway overhead under load (a probe reading the first page
through the gateway and straight from inbox, interleaved). Before the ramp, with nothing else
running: the same comparison (the 1.25x target) and the quiet send-to-stream latency.

Baseline (unless --no-baseline): first a second stack with the outbox relay's wake-up turned off
(OUTBOX_RELAY_WAKE_UP=false: the relay only polls every 0.2 s, as before) measures the quiet
send-to-stream latency; the ratio against the main stack's is reported. Since two stacks run at different
times, the main stack also measures the relay's own leg, interleaved: a document staged in this
process until its event is on a queue, by one relay with the wake-up and one without (polling),
side by side on the same database and broker (`--relay-pairs` each).

--profile: after the ramp, N is set back to the knee (or the first step if none met the target), the
load runs again, and py-spy (`py-spy` on PATH, or PY_SPY) samples the `--profile-top` (2) busiest
processes (children
included) for `--profile-s`, only the thread holding the GIL (where its Python time goes); the
functions with most samples (own and cumulative) are reported.

Target: knee >= 1,000 staff (p95 < 500 ms on every route, 0 errors). Results also go to
artifacts/bench/concurrency.json (and the profile's collapsed stacks to
artifacts/bench/concurrency-profile-<process>.txt).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pika
import psutil
import pymongo

from bench._env import ARTIFACTS, machine, private_vhost, use_stack_keys, write_report
from bench._load import Answer, HttpError, HttpPool, MllpSender, Page
from clinic.inbox.v1 import inbox_pb2
from services.kit.bus import BatchPublisher, Topology
from services.kit.events import new_envelope
from services.kit.outbox import OutboxRelay, outbox_fields
from services.launcher import Ports, Stack, StackConfig
from tests.e2e.lab_messages import oru
from tests.helpers import DEMO_PASSWORD

PASSWORD = "Bench-Concurrency-Password-2026"
TARGET_P95_MS, TARGET_KNEE, TARGET_GATEWAY_RATIO = 500.0, 1000, 1.25
BOARD_EVERY_S, OPEN_EVERY_S, MESSAGE_EVERY_S, LAB_EVERY_S = 60.0, 30.0, 180.0, 3600.0
ACTIVITY_EVERY_S = 30.0  # the page reports its user's activity at most every 30 s (web/static/js/idle.js)
DELIVERY_TIMEOUT_S = 30.0
TOKEN_REFRESH_AFTER_S = 10 * 60  # access tokens last 15 minutes: refreshed (as the page does) well before
ROUTES = {
    "tree": "GET /api/v1/board",
    "page": "GET /api/v1/board/items",
    "open": "GET /api/v1/board/items/{id}",
    "send": "POST /api/v1/messages",
    "activity": "POST /api/v1/auth/activity",
    "lab": "MLLP ORU^R01 (until its ACK)",
}
FIRST_PAGE = "/api/v1/board/items?folder=messages&limit=20"
HOST = "127.0.0.1"


# --- the stack ------------------------------------------------------------------------------------
@contextlib.contextmanager
def stack_running(name: str, *, wake: bool) -> Iterator[Stack]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp, private_vhost() as amqp_url:
        stack = Stack(
            StackConfig(
                run_dir=Path(tmp),
                ports=Ports.free(),
                amqp_url=amqp_url,
                extra_env={
                    "PASSWORD_HASH_PROFILE": "fast",
                    "LOGIN_SOURCE_ATTEMPTS_PER_MINUTE": "100000",
                    "OUTBOX_RELAY_WAKE_UP": "true" if wake else "false",
                },
                gateway_env={"DECK_RATE_LIMIT_MINUTE": "10000000", "DECK_AUTH_RATE_LIMIT_MINUTE": "10000000"},
            )
        )
        try:
            stack.start()
            use_stack_keys(stack)
            yield stack
        finally:
            stack.stop()


def stack_processes(stack: Stack) -> dict[str, psutil.Process]:
    """Every process of the stack by name, nx-27017, the broker's node and this load generator."""
    found: dict[str, psutil.Process] = {}
    for name in Stack.SERVICES:
        pid = stack.pid(name)
        if pid:
            with contextlib.suppress(psutil.Error):
                found[name] = psutil.Process(pid)
    if stack.mongo is not None and stack.mongo.process is not None:
        found["nx-27017"] = psutil.Process(stack.mongo.process.pid)
    for process in psutil.process_iter(["name"]):
        if process.info["name"] == "beam.smp":
            found["rabbitmq (shared)"] = process
            break
    found["load generator"] = psutil.Process(os.getpid())
    return found


def with_children(process: psutil.Process) -> list[psutil.Process]:
    """The process and its children; this process alone (its children are the stack's services)."""
    if process.pid == os.getpid():
        return [process]
    try:
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return [process]


class ProcessMeter:
    """CPU seconds and RSS of each process (children included) between start() and stop()."""

    def __init__(self, processes: dict[str, psutil.Process]):
        self.processes = processes
        self._cpu: dict[str, float] = {}
        self._at = 0.0

    @staticmethod
    def _cpu_s(process: psutil.Process) -> float:
        total = 0.0
        for p in with_children(process):
            with contextlib.suppress(psutil.Error):
                times = p.cpu_times()
                total += times.user + times.system
        return total

    @staticmethod
    def _rss_mb(process: psutil.Process) -> float:
        total = 0
        for p in with_children(process):
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total / 2**20

    def start(self) -> None:
        self._at = time.monotonic()
        self._cpu = {name: self._cpu_s(p) for name, p in self.processes.items()}

    def stop(self) -> dict[str, dict]:
        elapsed = time.monotonic() - self._at
        return {
            name: {
                "cpu_percent": round(100 * (self._cpu_s(p) - self._cpu[name]) / elapsed, 1),
                "rss_mb": round(self._rss_mb(p), 1),
            }
            for name, p in self.processes.items()
        }


# --- figures --------------------------------------------------------------------------------------
def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(samples: list[float]) -> dict:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered), 1),
        "p95_ms": round(percentile(ordered, 0.95), 1),
        "p99_ms": round(percentile(ordered, 0.99), 1),
        "max_ms": round(ordered[-1], 1),
        "n": len(ordered),
    }


# --- staff ----------------------------------------------------------------------------------------
@dataclass(eq=False)
class Staff:
    username: str
    staff_id: str = ""
    token: str = ""
    refresh_token: str = ""
    signed_in_at: float = 0.0
    items: list[str] = field(default_factory=list)
    page: Page | None = None
    task: asyncio.Task | None = None


async def bounded(limit: int, coroutines) -> list:
    gate = asyncio.Semaphore(limit)

    async def one(coroutine):
        async with gate:
            return await coroutine

    return await asyncio.gather(*(one(c) for c in coroutines))


def ok(answer: Answer, what: str) -> Answer:
    if answer.status >= 400:
        raise RuntimeError(f"{what}: HTTP {answer.status} {answer.body[:200]!r}")
    return answer


async def sign_in(gateway: HttpPool, username: str, password: str) -> dict:
    answer = await gateway.request("POST", "/api/v1/auth/token", body={"username": username, "password": password})
    return ok(answer, f"sign-in of {username}").json()


async def signed_in(gateway: HttpPool, member: Staff) -> Staff:
    body = await sign_in(gateway, member.username, PASSWORD)
    member.token, member.refresh_token, member.staff_id = (
        body["access_token"],
        body["refresh_token"],
        body["staff"]["id"],
    )
    member.signed_in_at = time.monotonic()
    if member.page is not None:
        member.page.token = member.token  # the stream's next reopening uses it
    return member


async def create_staff(gateway: HttpPool, admin_token: str, count: int) -> list[Staff]:
    tag = uuid.uuid4().hex[:6]

    async def create(n: int) -> Staff:
        username = f"load.{tag}.{n:05d}"
        body = {"username": username, "display_name": f"Load Staff {n:05d}", "password": PASSWORD, "roles": ["staff"]}
        created = ok(await gateway.request("POST", "/api/v1/directory/staff", token=admin_token, body=body), "create")
        return Staff(username, staff_id=created.json()["id"])  # signs in when the page is opened

    return await bounded(16, [create(n) for n in range(count)])


async def seed_items(gateway: HttpPool, token: str, staff: list[Staff]) -> None:
    """One message to everyone (25 recipients a message), so every board has an item to open."""
    groups = [staff[i : i + 25] for i in range(0, len(staff), 25)]
    await bounded(
        4,
        [
            gateway.request(
                "POST",
                "/api/v1/messages",
                token=token,
                body={"to_staff_ids": [m.staff_id for m in group], "subject": "Welcome", "body": "Clinic notice"},
            )
            for group in groups
        ],
    )


# --- the load ---------------------------------------------------------------------------------------
class Load:
    """The staff online and what they do, recorded while `recording`."""

    def __init__(self, stack: Stack, gateway: HttpPool, inbox: HttpPool, speed: float):
        self.stack, self.gateway, self.inbox, self.speed = stack, gateway, inbox, speed
        self.staff: list[Staff] = []  # everyone created; the first `len(online)` are online
        self.online: list[Staff] = []
        self.processes: dict[str, psutil.Process] = {}
        self.recording = False
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.errors: Counter = Counter()
        self.error_kinds: Counter = Counter()
        self.delivery: list[float] = []
        self.pending: dict[str, float] = {}  # recipient staff id -> when the message to them was sent
        self.lost = 0
        self.probe: dict[str, list[float]] = defaultdict(list)
        self.in_flight = 0
        self.max_in_flight = 0
        self.mllp = MllpSender(HOST, stack.config.ports.notifications_mllp)
        self._tasks: set[asyncio.Task] = set()
        self._labs = 0

    # what a page is told
    def on_board(self, page: Page, payload: str, at: float) -> None:
        sent = self.pending.get(page.staff_id)
        if sent is not None and at >= sent and '"messages"' in payload:
            del self.pending[page.staff_id]
            if self.recording:
                self.delivery.append((at - sent) * 1000)

    def expire_pending(self, now: float) -> None:
        for staff_id, sent in list(self.pending.items()):
            if now - sent > DELIVERY_TIMEOUT_S:
                del self.pending[staff_id]
                if self.recording:
                    self.lost += 1
                    self.errors["delivery"] += 1

    # staff joining and leaving
    async def join(self, members: list[Staff]) -> float:
        """Open the pages of `members` (each stream answered) and load their boards; returns seconds."""
        started = time.monotonic()
        await bounded(8, [signed_in(self.gateway, m) for m in members])
        for member in members:
            member.page = Page(member.staff_id, member.token)
            member.task = asyncio.create_task(member.page.run(HOST, self.stack.config.ports.gateway, self.on_board))

        async def ready(member: Staff) -> None:
            await asyncio.wait_for(member.page.connected.wait(), 120)
            await self.board(member, record=False)

        await bounded(100, [ready(m) for m in members])
        self.online += members
        return time.monotonic() - started

    async def leave(self, members: list[Staff]) -> None:
        for member in members:
            if member.page is not None:
                member.page.stop()
        await asyncio.gather(*(m.task for m in members if m.task is not None), return_exceptions=True)
        for member in members:
            member.page, member.task = None, None
        gone = {id(m) for m in members}
        self.online = [m for m in self.online if id(m) not in gone]

    # one action
    async def timed(self, route: str, pool: HttpPool, method: str, path: str, member: Staff, body=None, record=True):
        try:
            answer = await pool.request(method, path, token=member.token, body=body)
        except HttpError as exc:
            if record and self.recording:
                self.errors[route] += 1
                self.error_kinds[f"{route}: {exc}"[:120]] += 1
            return None
        if record and self.recording:
            self.samples[route].append(answer.ms)
            if answer.status >= 400:
                self.errors[route] += 1
                self.error_kinds[f"{route}: HTTP {answer.status} {answer.body[:80]!r}"] += 1
        return answer if answer.status < 400 else None

    async def board(self, member: Staff, record: bool = True) -> None:
        await self.timed("tree", self.gateway, "GET", "/api/v1/board", member, record=record)
        answer = await self.timed("page", self.gateway, "GET", FIRST_PAGE, member, record=record)
        if answer is not None:
            member.items = [item["id"] for item in answer.json().get("items", [])][:20]

    async def open_item(self, member: Staff) -> None:
        if not member.items:
            await self.board(member)
            return
        await self.timed("open", self.gateway, "GET", f"/api/v1/board/items/{random.choice(member.items)}", member)

    async def send(self, member: Staff) -> None:
        free = [m for m in random.sample(self.online, min(8, len(self.online))) if m is not member]
        free = [m for m in free if m.staff_id not in self.pending]
        if not free:
            return
        recipient = free[0]
        self.pending[recipient.staff_id] = time.monotonic()
        body = {"to_staff_ids": [recipient.staff_id], "subject": "Patient follow-up", "body": "Can you call back?"}
        if await self.timed("send", self.gateway, "POST", "/api/v1/messages", member, body=body) is None:
            self.pending.pop(recipient.staff_id, None)

    async def activity(self, member: Staff) -> None:
        await self.timed("activity", self.gateway, "POST", "/api/v1/auth/activity", member)

    async def refresh(self, member: Staff) -> None:
        answer = await self.gateway.request(
            "POST", "/api/v1/auth/refresh", body={"refresh_token": member.refresh_token}
        )
        if answer.status < 400:
            body = answer.json()
            member.token, member.refresh_token = body["access_token"], body["refresh_token"]
            member.signed_in_at = time.monotonic()
            if member.page is not None:
                member.page.token = member.token  # the stream's next reopening uses it

    async def lab(self) -> None:
        self._labs += 1
        message = oru(control_id=f"C{uuid.uuid4().hex[:16]}", patient=f"MRN-C{self._labs:07d}")
        try:
            ack, ms = await self.mllp.send(message)
        except HttpError as exc:
            if self.recording:
                self.errors["lab"] += 1
                self.error_kinds[f"lab: {exc}"] += 1
            return
        if self.recording:
            self.samples["lab"].append(ms)
            if b"MSA|AA|" not in ack:
                self.errors["lab"] += 1
                self.error_kinds["lab: not accepted"] += 1

    # the arrivals
    def spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            self.in_flight -= 1

        task.add_done_callback(done)

    async def arrivals(self, every_s: float, action, until: float, *, by_staff: bool = True) -> None:
        """Poisson arrivals at `online / every_s * speed` per second, each by a random staff member
        (`by_staff`) or by the lab."""
        while True:
            rate = len(self.online) * self.speed / every_s
            gap = random.expovariate(rate) if rate > 0 else 1.0
            left = until - time.monotonic()
            if gap >= left:  # the next arrival falls after the step: wait for its end, not for the arrival
                await asyncio.sleep(max(0.0, left))
                return
            await asyncio.sleep(gap)
            if self.online:
                self.spawn(action(random.choice(self.online)) if by_staff else action())

    async def gateway_probe(self, until: float, per_s: float = 4.0) -> None:
        """The first page of one staff member, through the gateway and straight from inbox, alternately."""
        member = self.online[0]
        pools = {"gateway": self.gateway, "direct": self.inbox}
        while time.monotonic() < until:
            for name, pool in pools.items():
                try:
                    answer = await pool.request("GET", FIRST_PAGE, token=member.token)
                except HttpError:
                    continue
                if self.recording and answer.status < 400:
                    self.probe[name].append(answer.ms)
                await asyncio.sleep(1 / per_s)

    async def refresh_tokens(self, until: float) -> None:
        while time.monotonic() < until:
            old = [m for m in self.online if time.monotonic() - m.signed_in_at > TOKEN_REFRESH_AFTER_S]
            if old:
                await bounded(4, [self.refresh(m) for m in old])
            await asyncio.sleep(5)

    async def run_for(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        workers = [
            self.arrivals(BOARD_EVERY_S, self.board, until),
            self.arrivals(OPEN_EVERY_S, self.open_item, until),
            self.arrivals(MESSAGE_EVERY_S, self.send, until),
            self.arrivals(LAB_EVERY_S, self.lab, until, by_staff=False),
            self.arrivals(ACTIVITY_EVERY_S, self.activity, until),
            self.gateway_probe(until),
            self.refresh_tokens(until),
            self.sweep(until),
        ]
        await asyncio.gather(*workers)

    async def sweep(self, until: float) -> None:
        while time.monotonic() < until:
            self.expire_pending(time.monotonic())
            await asyncio.sleep(1)

    async def settle(self, timeout_s: float = DELIVERY_TIMEOUT_S) -> None:
        """Wait for the requests in flight and the deliveries still pending (or their timeout)."""
        deadline = time.monotonic() + timeout_s + 5
        while (self._tasks or self.pending) and time.monotonic() < deadline:
            self.expire_pending(time.monotonic())
            await asyncio.sleep(0.1)

    def reset(self) -> None:
        self.samples.clear()
        self.errors.clear()
        self.error_kinds.clear()
        self.delivery.clear()
        self.probe.clear()
        self.lost = 0
        self.max_in_flight = self.in_flight


# --- the measurements ---------------------------------------------------------------------------------
async def gateway_vs_direct(load: Load, member: Staff, n: int, rounds: int = 5) -> dict:
    """Quiet: the first page through the gateway and straight from inbox, in interleaved rounds."""
    pools = {"gateway": load.gateway, "direct": load.inbox}
    samples: dict[str, list[float]] = {name: [] for name in pools}
    for pool in pools.values():
        for _ in range(30):  # warm connections, caches, the gateway's verified-token memory
            ok(await pool.request("GET", FIRST_PAGE, token=member.token), "warm-up")
    for _ in range(rounds):
        for name, pool in pools.items():
            for _ in range(max(1, n // rounds)):
                samples[name].append(ok(await pool.request("GET", FIRST_PAGE, token=member.token), "probe").ms)
    figures = {name: summary(values) for name, values in samples.items()}
    return {**figures, "p50_ratio": round(figures["gateway"]["p50_ms"] / figures["direct"]["p50_ms"], 3)}


async def quiet_delivery(load: Load, sender: Staff, recipients: list[Staff], n: int) -> dict:
    """One message at a time to a staff member whose page is open, from the send until the stream says so."""
    samples = []
    for i in range(n):
        recipient = recipients[i % len(recipients)]
        load.recording = True
        load.pending[recipient.staff_id] = sent = time.monotonic()
        body = {"to_staff_ids": [recipient.staff_id], "subject": "Live check", "body": "Are you there?"}
        ok(await load.gateway.request("POST", "/api/v1/messages", token=sender.token, body=body), "send")
        while recipient.staff_id in load.pending and time.monotonic() - sent < DELIVERY_TIMEOUT_S:
            await asyncio.sleep(0.002)
        load.pending.pop(recipient.staff_id, None)
        samples.extend(load.delivery)
        load.delivery.clear()
        await asyncio.sleep(0.05)
    load.recording = False
    return {**summary(samples), "lost": n - len(samples), "load_average_1m": round(os.getloadavg()[0], 2)}


async def step(load: Load, meter: ProcessMeter, n: int, args) -> dict:
    joining = [m for m in load.staff if m not in load.online][: n - len(load.online)]
    join_s = await load.join(joining)
    await load.run_for(args.warmup_s)
    load.reset()
    load.recording = True
    meter.start()
    loadavg = os.getloadavg()[0]
    await load.run_for(args.step_s)
    processes = meter.stop()
    load.recording = False
    await load.settle()
    seen = [route for route in ROUTES if route in load.samples or load.errors[route]]
    routes = {ROUTES[route]: {**summary(load.samples[route]), "errors": load.errors[route]} for route in seen}
    requests_total = sum(len(v) for v in load.samples.values())
    http_p95 = [row["p95_ms"] for row in routes.values() if row.get("n")]
    refused = sum(m.page.refused for m in load.online if m.page)
    reopened = sum(max(0, m.page.opened - 1) for m in load.online if m.page)
    probe = {name: summary(values) for name, values in load.probe.items()}
    result = {
        "staff": n,
        "staff_equivalent": round(n * args.speed),
        "join_seconds": round(join_s, 1),
        "requests": requests_total,
        "requests_per_s": round(requests_total / args.step_s, 1),
        "routes": routes,
        "worst_route_p95_ms": max(http_p95, default=0.0),
        "errors": sum(load.errors.values()),
        "error_kinds": dict(load.error_kinds.most_common(8)),
        "delivery": {**summary(load.delivery), "lost": load.lost},
        "streams_refused": refused,
        "streams_reopened": reopened,
        "max_in_flight": load.max_in_flight,
        "processes": processes,
        "gateway_probe": {
            **probe,
            "p50_ratio": (
                round(probe["gateway"]["p50_ms"] / probe["direct"]["p50_ms"], 3)
                if probe.get("gateway", {}).get("n") and probe.get("direct", {}).get("n")
                else None
            ),
        },
        "load_average_1m": round(loadavg, 2),
    }
    result["meets_target"] = result["worst_route_p95_ms"] < TARGET_P95_MS and result["errors"] == 0
    print_step(result)
    return result


def print_step(row: dict) -> None:
    d = row["delivery"]
    print(
        f"  N={row['staff']:>5} ({row['staff_equivalent']} eq.) {row['requests_per_s']:>6.1f} req/s  "
        f"worst p95 {row['worst_route_p95_ms']:>7.1f} ms  errors {row['errors']:>4}  "
        f"delivery p50/p99 {d.get('p50_ms', '-')}/{d.get('p99_ms', '-')} ms  "
        f"{'ok' if row['meets_target'] else 'MISSED'}",
        flush=True,
    )
    for route, figures in row["routes"].items():
        if figures.get("n"):
            print(
                f"      {route:<34} p50 {figures['p50_ms']:>7.1f}  p95 {figures['p95_ms']:>7.1f}  "
                f"p99 {figures['p99_ms']:>7.1f}  n {figures['n']:>6}  errors {figures['errors']}",
                flush=True,
            )
    busy = sorted(row["processes"].items(), key=lambda kv: -kv[1]["cpu_percent"])
    print("      cpu% / rss MB: " + ", ".join(f"{k} {v['cpu_percent']}/{v['rss_mb']:.0f}" for k, v in busy), flush=True)


# --- profiling at the knee -----------------------------------------------------------------------------
def py_spy() -> str | None:
    return os.environ.get("PY_SPY") or shutil.which("py-spy")


def top_functions(collapsed: str, limit: int = 15) -> dict:
    """From py-spy's collapsed stacks: the functions with most samples, own (at the top of the stack)
    and cumulative (anywhere on it), with their share of all samples."""
    own: Counter = Counter()
    cumulative: Counter = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames[1:]):  # the first frame is the thread
            cumulative[frame] += count
    share = lambda c: round(100 * c / total, 1) if total else 0.0  # noqa: E731
    return {
        "samples": total,
        "own": [{"function": f, "percent": share(c)} for f, c in own.most_common(limit)],
        "cumulative": [{"function": f, "percent": share(c)} for f, c in cumulative.most_common(limit)],
    }


async def profile(load: Load, meter: ProcessMeter, n: int, args) -> dict:
    """py-spy on the `--profile-top` busiest processes of the stack at `n` staff, at the same time."""
    tool = py_spy()
    if tool is None:
        return {"skipped": "py-spy not found (pip install py-spy, or set PY_SPY)"}
    if len(load.online) > n:
        await load.leave(load.online[n:])
    elif len(load.online) < n:
        await load.join([m for m in load.staff if m not in load.online][: n - len(load.online)])
    await load.run_for(args.warmup_s)
    meter.start()
    await load.run_for(10)
    busiest = sorted(
        ((name, row) for name, row in meter.stop().items() if name not in ("load generator", "rabbitmq (shared)")),
        key=lambda kv: -kv[1]["cpu_percent"],
    )[: args.profile_top]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    spies = {}
    for name, _ in busiest:
        output = ARTIFACTS / f"concurrency-profile-{name}.txt"
        command = [
            tool, "record", "--pid", str(load.processes[name].pid), "--duration", str(args.profile_s),
            "--rate", "100", "--format", "raw", "--output", str(output), "--nonblocking", "--subprocesses",
            "--gil",  # only the thread holding the GIL: where the process's Python time goes
        ]  # fmt: skip
        spies[name] = (output, await asyncio.create_subprocess_exec(*command, stdout=subprocess.DEVNULL,
                                                                   stderr=subprocess.PIPE))  # fmt: skip
    load_task = asyncio.create_task(load.run_for(args.profile_s + 2))
    results = []
    for (name, figures), (output, spy) in zip(busiest, spies.values(), strict=True):
        _, err = await spy.communicate()
        if spy.returncode != 0 or not output.exists():
            results.append({"process": name, "failed": err.decode(errors="replace")[-500:]})
            continue
        results.append({
            "staff": n,
            "process": name,
            "cpu_percent_before": figures["cpu_percent"],
            "collapsed_stacks": str(output.relative_to(ARTIFACTS.parent.parent)),
            **top_functions(output.read_text()),
        })  # fmt: skip
    await load_task
    await load.settle()
    return {"processes": results}


# --- the outbox relay's wake-up, on its own ---------------------------------------------------------
def relay_leg(stack: Stack, pairs: int) -> dict:
    """From a document staged in this process until its event is on a queue, with the relay's wake-up
    and without it (polling every 0.2 s), in alternation on the stack's database and broker: two
    relays (services.kit.outbox) in this process, each over a collection of its own."""
    tag = uuid.uuid4().hex[:8]
    client = pymongo.MongoClient(stack.mongo_uri)
    db = client[f"bench_relay_leg_{tag}"]
    topology = Topology(prefix=f"bench-relay-leg-{tag}")
    connection = pika.BlockingConnection(pika.URLParameters(stack.config.amqp_url))
    channel = connection.channel()
    topology.declare(channel)
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, topology.exchange_name, "#")
    stop = threading.Event()
    relays, threads, publishers = {}, [], []
    for mode, wake in (("wake_up", True), ("polling", False)):
        publisher = BatchPublisher(stack.config.amqp_url, topology, connection_name=f"bench-relay-{mode}")
        relay = OutboxRelay(db, [f"items_{mode}"], publisher, lease_ttl_s=None, wake=wake)
        relay.ensure_indexes()
        relays[mode] = relay
        publishers.append(publisher)
        threads.append(threading.Thread(target=relay.run_forever, args=(stop,), name=f"relay-{mode}", daemon=True))
    for thread in threads:
        thread.start()
    samples: dict[str, list[float]] = {mode: [] for mode in relays}
    try:
        time.sleep(0.5)
        for n in range(pairs + 2):
            for mode in relays:
                envelope = new_envelope(
                    "message.delivered.v1",
                    inbox_pb2.MessageDelivered(message_id=uuid.uuid4().hex, agency_id="agy", recipient_staff_id="s"),
                    agency_id="agy",
                    producer="inbox",
                )
                marker = envelope.event_id.encode()
                started = time.perf_counter()
                db[f"items_{mode}"].insert_one({"_id": uuid.uuid4().hex, **outbox_fields([envelope])})
                while time.perf_counter() - started < 10:
                    method, _, body = channel.basic_get(queue, auto_ack=True)
                    if method is None:
                        time.sleep(0.0005)
                    elif marker in body:
                        if n >= 2:  # the first two of each: warm-up
                            samples[mode].append((time.perf_counter() - started) * 1000)
                        break
                time.sleep(random.uniform(0.05, 0.25))  # not in step with the poll
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        for publisher in publishers:
            publisher.close()
        channel.exchange_delete(topology.exchange_name)
        channel.exchange_delete(topology.unrouted_name)
        channel.queue_delete(topology.unrouted_name)
        connection.close()
        client.drop_database(db.name)
        client.close()
    figures = {mode: summary(values) for mode, values in samples.items()}
    return {**figures, "p50_ratio": round(figures["wake_up"]["p50_ms"] / figures["polling"]["p50_ms"], 3)}


# --- runs -------------------------------------------------------------------------------------------
async def baseline_run(stack: Stack, args) -> dict:
    """The relay without wake-up: the quiet send-to-stream latency only."""
    gateway = HttpPool(HOST, stack.config.ports.gateway)
    inbox = HttpPool(HOST, stack.config.ports.inbox_http)
    load = Load(stack, gateway, inbox, args.speed)
    admin = await sign_in(gateway, "admin", DEMO_PASSWORD)
    load.staff = await create_staff(gateway, admin["access_token"], 11)
    await load.join(load.staff)
    delivery = await quiet_delivery(load, load.staff[0], load.staff[1:], args.quiet_messages)
    await load.leave(load.staff)
    gateway.close()
    inbox.close()
    return delivery


async def main_run(stack: Stack, args) -> dict:
    gateway = HttpPool(HOST, stack.config.ports.gateway)
    inbox = HttpPool(HOST, stack.config.ports.inbox_http)
    load = Load(stack, gateway, inbox, args.speed)
    load.processes = stack_processes(stack)
    meter = ProcessMeter(load.processes)
    admin = await sign_in(gateway, "admin", DEMO_PASSWORD)

    relay = await asyncio.to_thread(relay_leg, stack, args.relay_pairs)
    print(
        f"  relay leg: staged -> on a queue p50 {relay['wake_up']['p50_ms']} ms with the wake-up, "
        f"{relay['polling']['p50_ms']} ms polling ({relay['p50_ratio']}x)",
        flush=True,
    )
    # The quiet send-to-stream latency first, set up exactly as in the baseline's stack.
    load.staff = await create_staff(gateway, admin["access_token"], 11)
    await load.join(load.staff)
    delivery = await quiet_delivery(load, load.staff[0], load.staff[1:], args.quiet_messages)

    started = time.monotonic()
    meter.start()
    load.staff += await create_staff(gateway, admin["access_token"], max(args.ramp) - 11)
    await seed_items(gateway, admin["access_token"], load.staff)
    setup = {"seconds": round(time.monotonic() - started, 1), "staff_created": len(load.staff)}
    at_rest = meter.stop()
    print(f"  {len(load.staff)} staff created in {setup['seconds']} s", flush=True)
    quiet = {
        "gateway_vs_direct": await gateway_vs_direct(load, load.staff[0], args.probe_requests),
        "delivery": delivery,
    }
    print(
        f"  quiet: gateway/direct p50 {quiet['gateway_vs_direct']['p50_ratio']}, "
        f"delivery p50 {quiet['delivery'].get('p50_ms')} ms",
        flush=True,
    )

    steps = []
    for n in args.ramp:
        row = await step(load, meter, n, args)
        steps.append(row)
        if row["errors"] > 0.05 * max(1, row["requests"]) or row["worst_route_p95_ms"] > 5 * TARGET_P95_MS:
            print("  far past the target: the ramp stops here", flush=True)
            break
    met = [row["staff"] for row in steps if row["meets_target"]]
    knee = max(met) if met else None
    profiled = None
    if args.profile:
        profiled = await profile(load, meter, knee or steps[0]["staff"], args)
    await load.leave(list(load.online))
    load.mllp.close()
    gateway.close()
    inbox.close()
    return {
        "relay_leg": relay,
        "setup": setup,
        "processes_while_creating_staff": at_rest,
        "quiet": quiet,
        "steps": steps,
        "knee_staff": knee,
        "knee_staff_equivalent": round(knee * args.speed) if knee else None,
        "profile": profiled,
    }


def report(results: dict, args) -> bool:
    results["machine"] = machine()
    path = write_report("concurrency", results)
    print(f"\nConcurrency benchmark ({args.speed}x the clinician's rates; step {args.step_s:.0f} s recorded)")
    header = (
        f"  {'N':>6} {'req/s':>7} {'p50':>7} {'p95':>7} {'p99':>7} {'errors':>6}"
        f" {'deliv p50':>9} {'deliv p99':>9}  cpu% (busiest 3)"
    )
    print(header)
    for row in results["steps"]:
        all_ms = [r for r in row["routes"].values() if r.get("n")]
        worst = max(all_ms, key=lambda r: r["p95_ms"], default={"p50_ms": 0, "p95_ms": 0, "p99_ms": 0})
        busy = sorted(
            ((k, v) for k, v in row["processes"].items() if k != "load generator"), key=lambda kv: -kv[1]["cpu_percent"]
        )[:3]
        d = row["delivery"]
        print(
            f"  {row['staff']:>6} {row['requests_per_s']:>7.1f} {worst['p50_ms']:>7.1f} {worst['p95_ms']:>7.1f}"
            f" {worst['p99_ms']:>7.1f} {row['errors']:>6} {d.get('p50_ms', 0):>9} {d.get('p99_ms', 0):>9}  "
            + ", ".join(f"{k} {v['cpu_percent']:.0f}% {v['rss_mb']:.0f}MB" for k, v in busy)
        )
    print("  (p50/p95/p99: the route with the worst p95; per route in the JSON)")
    knee = results["knee_staff"]
    met = knee is not None and knee >= TARGET_KNEE
    print(
        f"  knee: {knee} staff ({results['knee_staff_equivalent']} staff-equivalent); "
        f"target >= {TARGET_KNEE}: {'met' if met else 'NOT met'}"
    )
    quiet = results["quiet"]["gateway_vs_direct"]
    print(
        f"  gateway overhead (quiet): p50 {quiet['gateway']['p50_ms']} vs direct {quiet['direct']['p50_ms']} ms "
        f"= {quiet['p50_ratio']}x (target <= {TARGET_GATEWAY_RATIO})"
    )
    base = results.get("baseline_delivery_without_wake_up")
    now = results["quiet"]["delivery"]
    if base and base.get("p50_ms") and now.get("p50_ms"):
        results["delivery_wake_up_ratio"] = round(now["p50_ms"] / base["p50_ms"], 3)
        print(
            f"  send->stream (quiet) p50 {now['p50_ms']} ms with the relay's wake-up vs {base['p50_ms']} ms polling "
            f"= {results['delivery_wake_up_ratio']}x; p99 {now['p99_ms']} vs {base['p99_ms']} ms"
        )
    leg = results.get("relay_leg")
    if leg:
        print(
            f"  outbox relay, staged -> on a queue: p50 {leg['wake_up']['p50_ms']} / p99 {leg['wake_up']['p99_ms']} ms "
            f"with the wake-up vs {leg['polling']['p50_ms']} / {leg['polling']['p99_ms']} ms polling "
            f"= {leg['p50_ratio']}x (interleaved, same run)"
        )
    for profiled in (results.get("profile") or {}).get("processes", []):
        if profiled.get("own"):
            who = f"{profiled['process']} at N={profiled['staff']}"
            print(f"  profile of {who} ({profiled['samples']} samples), own time:")
            for row in profiled["own"][:10]:
                print(f"      {row['percent']:>5.1f}%  {row['function']}")
    write_report("concurrency", results)
    print(f"  results: {path}")
    return met


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ramp", type=lambda s: [int(x) for x in s.split(",")], default=[100, 250, 500, 750, 1000, 1250]
    )
    parser.add_argument("--speed", type=float, default=1.0, help="time compression: every rate times this")
    parser.add_argument("--step-s", type=float, default=60.0, help="recorded seconds per step")
    parser.add_argument("--warmup-s", type=float, default=10.0, help="unrecorded seconds before each step")
    parser.add_argument("--probe-requests", type=int, default=300, help="quiet gateway-vs-direct requests each")
    parser.add_argument("--quiet-messages", type=int, default=40, help="quiet send-to-stream samples")
    parser.add_argument("--relay-pairs", type=int, default=60, help="relay leg samples, each way")
    parser.add_argument("--no-baseline", action="store_true", help="skip the stack without the relay's wake-up")
    parser.add_argument("--profile", action="store_true", help="py-spy the busiest process at the knee")
    parser.add_argument("--profile-s", type=int, default=30)
    parser.add_argument("--profile-top", type=int, default=2, help="how many of the busiest processes to profile")
    args = parser.parse_args()
    if sorted(args.ramp) != args.ramp or args.ramp[0] < 11:
        parser.error("--ramp must be increasing, from at least 11")
    return args


def main() -> int:
    args = parse_args()
    results: dict = {
        "speed": args.speed,
        "step_seconds": args.step_s,
        "model": {
            "board_every_s": BOARD_EVERY_S / args.speed,
            "open_item_every_s": OPEN_EVERY_S / args.speed,
            "message_every_s": MESSAGE_EVERY_S / args.speed,
            "lab_result_every_s": LAB_EVERY_S / args.speed,
        },
    }
    if not args.no_baseline:
        print("baseline: the outbox relay without its wake-up (polling every 0.2 s)", flush=True)
        with stack_running("concurrency-base", wake=False) as stack:
            results["baseline_delivery_without_wake_up"] = asyncio.run(baseline_run(stack, args))
        print(f"  quiet delivery p50 {results['baseline_delivery_without_wake_up'].get('p50_ms')} ms", flush=True)
    print("main: every service's defaults", flush=True)
    with stack_running("concurrency", wake=True) as stack:
        results.update(asyncio.run(main_run(stack, args)))
    return 0 if report(results, args) else 1


if __name__ == "__main__":
    sys.exit(main())
