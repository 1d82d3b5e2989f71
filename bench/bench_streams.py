"""Open pages benchmark: one web process and the gateway holding 2,000 pages' live event streams,
and what holding them costs everything else, against baselines measured in the same run.

    python -m bench.bench_streams [--streams 2000] [--messages 200] [--requests 300] [--rounds 3]

Starts its own stack (embedded database, private RabbitMQ vhost, free ports) with web's default
settings; only the sign-in limits and the gateway's rate limits are raised, so that one client may
sign 2,000 staff in. That many staff members are created in the demo agency (Riverbend) through
directory's API and each signs in once: one page, one stream per staff member, as in a clinic.
Every stream goes through the gateway; this client holds them all on one asyncio loop
(tests/live_streams.py), recording when each event arrives.

Reported:
- memory: RSS of web and of the gateway with no stream open and with every stream open (MB per stream);
- REST: `GET /api/v1/board` p50 with no stream open and with half of them open, in interleaved
  rounds (the ratio);
- delivery: with half of them open, a message sent through the REST API to a staff member whose page
  is open, timed from the send until the page's stream emits the change (p50, p99);
- an announcement to the whole agency with every stream open: the time until the last page is told,
  and a message sent right after it (is it held up by the fan-out?);
- idle cost: the CPU of web and the gateway while every stream sits open (a heartbeat every 15 s,
  each one preceded by the token's full verification);
- signed-out sessions' streams end within a heartbeat (web looks every second), and so does a stream
  whose token expires.

Targets: delivery p50 <= 200 ms and p99 <= 1 s; REST p50 with streams <= 1.5x without; web's RSS
grows by less than 150 MB for 2,000 streams.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bench._env import machine, private_vhost, use_stack_keys, write_report
from clinic.inbox.v1 import inbox_pb2
from services.directory.tokens import KeySet, issue_access_token
from services.kit.bus import Publisher, Topology
from services.kit.events import new_envelope
from services.launcher import Ports, Stack, StackConfig
from tests.helpers import DEMO_PASSWORD
from tests.live_streams import LiveStreams, Stream

PASSWORD = "Bench-Streams-Password-2026"
HEARTBEAT_S = 15.0  # web's default WEB_EVENTS_HEARTBEAT_S
VERIFIER_LEEWAY_S = 30  # services.kit.auth.TokenVerifier's default: a token verifies this long after it expires
TARGET_P50_MS, TARGET_P99_MS, TARGET_REST_RATIO, TARGET_WEB_MB = 200.0, 1000.0, 1.5, 150.0
BOARD = "/api/v1/board"


@contextlib.contextmanager
def streams_stack() -> Iterator[Stack]:
    """The whole system with web's defaults; sign-in and gateway rate limits out of the way of one client."""
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as tmp, private_vhost() as amqp_url:
        stack = Stack(
            StackConfig(
                run_dir=Path(tmp),
                ports=Ports.free(),
                amqp_url=amqp_url,
                extra_env={"PASSWORD_HASH_PROFILE": "fast", "LOGIN_SOURCE_ATTEMPTS_PER_MINUTE": "100000"},
                gateway_env={"DECK_RATE_LIMIT_MINUTE": "1000000", "DECK_AUTH_RATE_LIMIT_MINUTE": "1000000"},
            )
        )
        try:
            stack.start()
            use_stack_keys(stack)  # what this process publishes is signed as inbox signs it
            yield stack
        finally:
            stack.stop()


# --- the process's figures ----------------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def open_streams(stack: Stack) -> int:
    """What web itself counts (its readiness answer, on its own port)."""
    return requests.get(f"{stack.web_url}/readyz", timeout=10).json().get("event_streams", -1)


def wait_for(condition, timeout_s: float, what: str, pause_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(pause_s)


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(samples), 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 2),
        "max_ms": round(ordered[-1], 2),
        "n": len(samples),
    }


# --- staff, each signed in once -------------------------------------------------------------------
class Person:
    def __init__(self, username: str, body: dict):
        self.username = username
        self.token = body["access_token"]
        self.refresh_token = body["refresh_token"]
        self.staff_id = body["staff"]["id"]
        self.agency_id = body["staff"]["agency_id"]


def sign_in(base: str, username: str, password: str) -> Person:
    reply = requests.post(f"{base}/api/v1/auth/token", json={"username": username, "password": password}, timeout=30)
    reply.raise_for_status()
    return Person(username, reply.json())


def staff_members(stack: Stack, count: int) -> list[Person]:
    """`count` new staff members of the admin's agency, created through directory's API, each signed in."""
    admin = sign_in(stack.gateway_url, "admin", DEMO_PASSWORD)
    tag = uuid.uuid4().hex[:6]
    local = threading.local()

    def http() -> requests.Session:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        return local.session

    def create(n: int) -> str:
        username = f"bench.{tag}.{n:05d}"
        reply = http().post(
            f"{stack.gateway_url}/api/v1/directory/staff",
            json={
                "username": username,
                "display_name": f"Bench Staff {n:05d}",
                "password": PASSWORD,
                "roles": ["staff"],
            },
            headers={"Authorization": f"Bearer {admin.token}"},
            timeout=60,
        )
        reply.raise_for_status()
        return username

    with ThreadPoolExecutor(8) as pool:
        usernames = list(pool.map(create, range(count)))
        return list(pool.map(lambda name: sign_in(stack.gateway_url, name, PASSWORD), usernames))


# --- the measurements -----------------------------------------------------------------------------
def rest_samples(session: requests.Session, url: str, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        reply = session.get(url, timeout=30)
        samples.append((time.perf_counter() - start) * 1000)
        reply.raise_for_status()
    return samples


def delivery_samples(sender: requests.Session, base: str, pages: list[tuple[Person, Stream]]) -> dict[str, list]:
    """One message to each page's staff member, one after another: from the send until the stream said
    so (`total`), and how much of that was the send's own answer (`answered`)."""
    samples: dict[str, list] = {"total": [], "answered": []}
    for person, page in pages:
        since = time.monotonic()
        reply = sender.post(
            f"{base}/api/v1/messages",
            json={"to_staff_ids": [person.staff_id], "subject": "Live check", "body": "Are you there?"},
            timeout=30,
        )
        answered = time.monotonic()
        reply.raise_for_status()
        wait_for(lambda p=page, t=since: p.saw("board", '"messages"', t), 30, "a message's live event")
        samples["total"].append((page.first("board", '"messages"', since).at - since) * 1000)
        samples["answered"].append((answered - since) * 1000)
    return samples


def bus_leg(stack: Stack, pages: list[tuple[Person, Stream]], everyone: list[Stream]) -> dict:
    """The part of the way that is web's and the gateway's: delivery events published straight onto the
    bus (as inbox's relay publishes them), timed until the page's stream emits them. One message event
    per page, one after another, then one announcement to every page."""
    publisher = Publisher(stack.config.amqp_url, Topology(), connection_name="bench-streams")
    samples = []
    try:
        for person, page in pages:
            event = inbox_pb2.MessageDelivered(recipient_staff_id=person.staff_id, board_kind="messages")
            since = time.monotonic()
            publisher.publish(
                [new_envelope("message.delivered.v1", event, agency_id=person.agency_id, producer="inbox")]
            )
            wait_for(lambda p=page, t=since: p.saw("board", '"messages"', t), 30, "a published event's live event")
            samples.append((page.first("board", '"messages"', since).at - since) * 1000)
        agency_id = pages[0][0].agency_id
        posted = inbox_pb2.AnnouncementPosted(announcement_id=f"ann_bench_{uuid.uuid4().hex[:8]}")
        since = time.monotonic()
        publisher.publish([new_envelope("announcement.posted.v1", posted, agency_id=agency_id, producer="inbox")])
        wait_for(lambda: all(p.saw("board", '"announcements"', since) for p in everyone), 60, "every page's event")
    finally:
        publisher.close()
    told = sorted((p.first("board", '"announcements"', since).at - since) * 1000 for p in everyone)
    return {
        "message_event": summary(samples),
        "announcement_event": {
            "pages": len(everyone),
            "first_page_ms": round(told[0], 1),
            "last_page_ms": round(told[-1], 1),
        },
    }


def announcement(
    admin: requests.Session, sender: requests.Session, base: str, pages: list[Stream], witness: tuple[Person, Stream]
) -> dict:
    """Post to the whole agency, then at once send a message to one page: when each was told."""
    person, page = witness
    since = time.monotonic()
    posted = admin.post(
        f"{base}/api/v1/announcements",
        json={"title": f"Notice {uuid.uuid4().hex[:6]}", "body": "Staff meeting at noon."},
        timeout=30,
    )
    posted.raise_for_status()
    sent_at = time.monotonic()
    sender.post(
        f"{base}/api/v1/messages",
        json={"to_staff_ids": [person.staff_id], "subject": "During the notice", "body": "Still live?"},
        timeout=30,
    ).raise_for_status()
    wait_for(lambda: all(p.saw("board", '"announcements"', since) for p in pages), 120, "every page's announcement")
    wait_for(lambda: page.saw("board", '"messages"', sent_at), 60, "the message sent during the announcement")
    told = sorted((p.first("board", '"announcements"', since).at - since) * 1000 for p in pages)
    return {
        "pages": len(pages),
        "first_page_ms": round(told[0], 1),
        "median_page_ms": round(statistics.median(told), 1),
        "last_page_ms": round(told[-1], 1),
        "message_sent_after_it_ms": round((page.first("board", '"messages"', sent_at).at - sent_at) * 1000, 1),
    }


def revocations(base: str, pages: list[tuple[Person, Stream]]) -> dict:
    """Sign these sessions out; how long until each one's stream said `reauthenticate` and ended."""
    signed_out = {}
    for person, page in pages:
        requests.post(f"{base}/api/v1/auth/logout", json={"refresh_token": person.refresh_token}, timeout=30)
        signed_out[id(page)] = time.monotonic()
    wait_for(lambda: all(page.ended for _, page in pages), HEARTBEAT_S * 3, "signed-out sessions' streams to end")
    waited = []
    for _, page in pages:
        told = page.first("reauthenticate")
        waited.append((told.at - signed_out[id(page)]) if told else float("inf"))
    return {
        "sessions": len(pages),
        "all_told_to_reauthenticate": all(w != float("inf") for w in waited),
        "p50_s": round(statistics.median(waited), 2),
        "max_s": round(max(waited), 2),
    }


def expiry(stack: Stack, live: LiveStreams, person: Person) -> dict:
    """A stream whose token stops verifying 5 s after it opens (signed with the stack's development key,
    as directory signs: its life is only shorter than directory would give it)."""
    keys = KeySet.from_pem((stack.run_dir / "secrets" / "jwt-signing-key.pem").read_text())
    issued = int(time.time()) - 60 - VERIFIER_LEEWAY_S + 5
    token = issue_access_token(
        keys,
        staff_id=person.staff_id,
        agency_id=person.agency_id,
        roles=["staff"],
        name="Bench expiry",
        session_id=f"ses_bench_{uuid.uuid4().hex[:8]}",
        ttl_s=60,
        now=issued,
    ).token
    invalid_at = time.monotonic() + (issued + 60 + VERIFIER_LEEWAY_S - time.time())
    (page,) = live.open([token])
    if not page.connected:
        return {"opened": False, "status": page.status}
    wait_for(lambda: page.ended, HEARTBEAT_S * 3, "the expiring token's stream to end")
    told = page.first("reauthenticate")
    return {
        "opened": True,
        "told_to_reauthenticate": told is not None,
        "ended_after_token_stopped_verifying_s": round(told.at - invalid_at, 2) if told else None,
    }


def run(stack: Stack, args) -> dict:
    pids = {"web": stack.pid("web"), "gateway": stack.pid("gateway")}
    started = time.perf_counter()
    people = staff_members(stack, args.streams + 1)
    expiring, people = people[-1], people[: args.streams]
    setup_s = round(time.perf_counter() - started, 1)
    half = args.streams // 2

    reader = requests.Session()
    reader.headers["Authorization"] = f"Bearer {people[0].token}"
    sender = requests.Session()
    sender.headers["Authorization"] = f"Bearer {sign_in(stack.gateway_url, 'dr.reyes', DEMO_PASSWORD).token}"
    admin = requests.Session()
    admin.headers["Authorization"] = f"Bearer {sign_in(stack.gateway_url, 'admin', DEMO_PASSWORD).token}"
    board = stack.gateway_url + BOARD

    with LiveStreams(stack.gateway_url) as live:
        # Warm every path once (the event server's token checks, the gateway's route), then none open.
        warm = live.open([p.token for p in people[:20]])
        rest_samples(reader, board, 50)
        live.close(warm)
        wait_for(lambda: open_streams(stack) == 0, 30, "the warm-up streams to close")
        time.sleep(1)
        rss_before = {name: rss_mb(pid) for name, pid in pids.items()}

        # REST with none and with half of the streams open, in interleaved rounds; delivery in the first.
        rest = {"none_open": [], "half_open": []}
        delivery: dict[str, list] = {}
        open_s = []
        per_round = max(1, args.requests // args.rounds)
        for round_ in range(args.rounds):
            rest["none_open"] += rest_samples(reader, board, per_round)
            t = time.perf_counter()
            pages = live.open([p.token for p in people[:half]])
            open_s.append(time.perf_counter() - t)
            if not all(page.connected for page in pages):
                raise RuntimeError(f"{sum(not p.connected for p in pages)} streams were refused")
            rest["half_open"] += rest_samples(reader, board, per_round)
            if round_ == 0:
                recipients = list(zip(people, pages, strict=False))[: args.messages]
                delivery = delivery_samples(sender, stack.gateway_url, recipients)
            live.close(pages)
            wait_for(lambda: open_streams(stack) == 0, 60, "the round's streams to close")

        # Every stream open.
        t = time.perf_counter()
        pages = live.open([p.token for p in people])
        open_all_s = time.perf_counter() - t
        refused = sum(not page.connected for page in pages)
        counted = open_streams(stack)
        time.sleep(2)
        rss_after = {name: rss_mb(pid) for name, pid in pids.items()}
        cpu_before = {name: cpu_s(pid) for name, pid in pids.items()}
        time.sleep(args.idle_s)
        idle_cpu = {name: round(100 * (cpu_s(pid) - cpu_before[name]) / args.idle_s, 1) for name, pid in pids.items()}
        announcements = [
            announcement(admin, sender, stack.gateway_url, pages, (people[n], pages[n]))
            for n in range(args.announcements)
        ]
        web_leg = bus_leg(stack, list(zip(people, pages, strict=True))[: args.messages], pages)
        ended = revocations(stack.gateway_url, list(zip(people, pages, strict=True))[-args.sign_outs :])
        expired = expiry(stack, live, expiring)
        still_open = sum(not page.ended for page in pages)

    rest_summary = {name: summary(values) for name, values in rest.items()}
    return {
        "streams": args.streams,
        "setup_seconds": setup_s,
        "opened": {
            "seconds_for_half": round(statistics.median(open_s), 2),
            "seconds_for_all": round(open_all_s, 2),
            "refused": refused,
            "web_counted": counted,
        },
        "rss_mb": {
            name: {
                "before": round(rss_before[name], 1),
                "all_open": round(rss_after[name], 1),
                "added": round(rss_after[name] - rss_before[name], 1),
                "kb_per_stream": round((rss_after[name] - rss_before[name]) * 1024 / args.streams, 1),
            }
            for name in pids
        },
        "idle_cpu_percent_all_open": idle_cpu,
        "rest_board": rest_summary,
        "rest_p50_ratio": round(rest_summary["half_open"]["p50_ms"] / rest_summary["none_open"]["p50_ms"], 3),
        "delivery_half_open": summary(delivery["total"]),
        "delivery_send_answered_half_open": summary(delivery["answered"]),
        "announcements_all_open": announcements,
        "bus_to_page_all_open": web_leg,
        "sign_outs": ended,
        "expiry": expired,
        "streams_open_at_the_end": still_open,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def report(results: dict) -> bool:
    results["machine"] = machine()
    path = write_report("streams", results)
    n = results["streams"]
    print(f"Open pages benchmark: {n:,} live event streams through the gateway, one per staff member")
    opened = results["opened"]
    print(
        f"  opened {n:,} in {opened['seconds_for_all']} s ({n // 2:,} in {opened['seconds_for_half']} s); "
        f"refused {opened['refused']}; web counted {opened['web_counted']}"
    )
    for name, row in results["rss_mb"].items():
        print(
            f"  RSS {name:<8} {row['before']:>7.1f} MB -> {row['all_open']:>7.1f} MB  "
            f"(+{row['added']:.1f} MB, {row['kb_per_stream']:.1f} KB per stream)"
        )
    cpu = results["idle_cpu_percent_all_open"]
    print(f"  CPU while all sit open: web {cpu['web']}%, gateway {cpu['gateway']}%")
    rest = results["rest_board"]
    print(
        f"  GET {BOARD} p50: {rest['none_open']['p50_ms']} ms with none open, {rest['half_open']['p50_ms']} ms "
        f"with {n // 2:,} open (x{results['rest_p50_ratio']})"
    )
    d = results["delivery_half_open"]
    print(
        f"  message -> open page, {n // 2:,} open: p50 {d['p50_ms']} ms, p99 {d['p99_ms']} ms, max {d['max_ms']} ms "
        f"({d['n']} messages; the send's own answer: p50 {results['delivery_send_answered_half_open']['p50_ms']} ms)"
    )
    for a in results["announcements_all_open"]:
        print(
            f"  announcement to {a['pages']:,} open pages: first {a['first_page_ms']} ms, median "
            f"{a['median_page_ms']} ms, last {a['last_page_ms']} ms; a message sent right after it: "
            f"{a['message_sent_after_it_ms']} ms"
        )
    leg = results["bus_to_page_all_open"]
    print(
        f"  web and gateway only (events published on the bus), {n:,} open: message p50 "
        f"{leg['message_event']['p50_ms']} ms, p99 {leg['message_event']['p99_ms']} ms; announcement to "
        f"{leg['announcement_event']['pages']:,} pages: first {leg['announcement_event']['first_page_ms']} ms, "
        f"last {leg['announcement_event']['last_page_ms']} ms"
    )
    s = results["sign_outs"]
    print(
        f"  {s['sessions']} sessions signed out: streams ended after p50 {s['p50_s']} s, max {s['max_s']} s "
        f"(heartbeat {HEARTBEAT_S:.0f} s)"
    )
    e = results["expiry"]
    print(
        f"  expiring token: stream ended {e.get('ended_after_token_stopped_verifying_s')} s after it stopped verifying"
    )
    checks = {
        "delivery p50": d["p50_ms"] <= TARGET_P50_MS,
        "delivery p99": d["p99_ms"] <= TARGET_P99_MS,
        "REST p50 ratio": results["rest_p50_ratio"] <= TARGET_REST_RATIO,
        "web RSS added": results["rss_mb"]["web"]["added"] < TARGET_WEB_MB,
        "all opened": opened["refused"] == 0 and opened["web_counted"] >= n,
        "sign-outs ended within a heartbeat": s["all_told_to_reauthenticate"] and s["max_s"] <= HEARTBEAT_S + 5,
        "expiry ended within a heartbeat": bool(e.get("told_to_reauthenticate"))
        and e["ended_after_token_stopped_verifying_s"] <= HEARTBEAT_S + 5,
    }
    for name, met in checks.items():
        print(f"  {name}: {'met' if met else 'NOT met'}")
    print(f"  load average (1 min) {results['load_average_1m']} on {results['machine']['cpus']} CPUs; stored in {path}")
    return all(checks.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=200, help="messages timed with half of the streams open")
    parser.add_argument("--requests", type=int, default=300, help="REST requests per condition, over all rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--announcements", type=int, default=3)
    parser.add_argument("--sign-outs", type=int, default=20)
    parser.add_argument("--idle-s", type=float, default=30.0, help="how long CPU is measured with all open")
    args = parser.parse_args()
    with streams_stack() as stack:
        results = run(stack, args)
    return 0 if report(results) else 1


if __name__ == "__main__":
    sys.exit(main())
