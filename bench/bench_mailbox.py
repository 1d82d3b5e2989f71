"""Mailbox benchmark: sends per second and first-page latency, through the gateway and
directly against inbox, and first-page latency for a board of 1,000 vs 100,000 items.

    python -m bench.bench_mailbox [--items 100000] [--requests 300]

Starts its own stack (embedded database, private RabbitMQ vhost, free ports).
Baselines are measured in the same run: direct inbox for the gateway figures,
the 1,000-item board for the 100,000-item one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import requests

from bench._env import machine, running_stack, write_report
from services.directory.demo import DEMO_PASSWORD
from services.inbox import domain
from services.kit.crypto import KeyRing, PhiCipher
from services.kit.mongo import database
from services.kit.settings import Env, common_settings
from services.launcher import Stack

PASSWORD = DEMO_PASSWORD


def login(base: str, username: str) -> tuple[str, str, str]:
    body = requests.post(
        f"{base}/api/v1/auth/token", json={"username": username, "password": PASSWORD}, timeout=10
    ).json()
    return body["access_token"], body["staff"]["id"], body["staff"]["agency_id"]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def timed_gets(session: requests.Session, url: str, n: int) -> list[float]:
    for _ in range(10):  # warm connections and caches
        session.get(url, timeout=10).raise_for_status()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        reply = session.get(url, timeout=10)
        samples.append((time.perf_counter() - start) * 1000)
        reply.raise_for_status()
    return samples


def timed_sends(session: requests.Session, url: str, recipient: str, n: int) -> float:
    body = {"to_staff_ids": [recipient], "subject": "Bench", "body": "Benchmark message"}
    session.post(url, json=body, timeout=10).raise_for_status()
    start = time.perf_counter()
    for _ in range(n):
        session.post(url, json=body, timeout=10).raise_for_status()
    return n / (time.perf_counter() - start)


def inbox_board_writer(stack: Stack):
    """Inbox's database and PHI cipher, built the way the service builds them."""
    settings = common_settings(Env("inbox", stack.service_env()))
    db = database(settings.mongo_uri, settings.mongo_db)
    return db, PhiCipher(KeyRing(db, settings.phi_master_keys, settings.phi_master_key_id))


def seed_board(db, cipher: PhiCipher, agency_id: str, owner: str, sender: str, count: int) -> None:
    """Put `count` items on a board directly in inbox's database (as fan-out would)."""
    base_ms = int(time.time() * 1000) - count * 1000
    batch = []
    for n in range(count):
        message_id = domain.new_message_id()
        doc = {
            "_id": message_id,
            "agency_id": agency_id,
            "thread_id": message_id,
            "sender_id": sender,
            "sender_name": "Bench Sender",
            "recipient_ids": [owner],
            "priority": "normal",
            "subject": cipher.seal(agency_id, message_id, "subject", f"Seeded item {n}"),
            "sent_at": base_ms + n * 1000,
        }
        batch.append(domain.board_item(doc, owner, domain.FOLDER_MESSAGES))
        if len(batch) == 5000:
            db.board_items.insert_many(batch, ordered=False)
            batch = []
    if batch:
        db.board_items.insert_many(batch, ordered=False)


def summary(samples: list[float]) -> dict:
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(percentile(samples, 0.99), 3),
        "n": len(samples),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--sends", type=int, default=300)
    args = parser.parse_args()

    with running_stack("mailbox") as stack:
        results = run(stack, args)
    return 0 if report(results) else 1


def run(stack: Stack, args) -> dict:
    sender_token, sender_id, agency = login(stack.gateway_url, "admin")
    small_token, small_id, _ = login(stack.gateway_url, "dr.reyes")
    big_token, big_id, _ = login(stack.gateway_url, "nurse.kim")

    started = time.perf_counter()
    db, cipher = inbox_board_writer(stack)
    seed_board(db, cipher, agency, small_id, sender_id, args.small)
    seed_board(db, cipher, agency, big_id, sender_id, args.items)
    seed_s = time.perf_counter() - started

    def session(token: str) -> requests.Session:
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {token}"
        return s

    page = "/api/v1/messages?limit=20"
    results = {"seed_seconds": round(seed_s, 1), "items_small": args.small, "items_big": args.items}
    # Interleave direct and gateway runs so machine noise hits both alike.
    direct_small, gateway_small, direct_big, gateway_big = [], [], [], []
    for _ in range(3):
        direct_small += timed_gets(session(small_token), stack.inbox_url + page, args.requests // 3)
        gateway_small += timed_gets(session(small_token), stack.gateway_url + page, args.requests // 3)
        direct_big += timed_gets(session(big_token), stack.inbox_url + page, args.requests // 3)
        gateway_big += timed_gets(session(big_token), stack.gateway_url + page, args.requests // 3)
    results["first_page"] = {
        "direct_1k": summary(direct_small),
        "gateway_1k": summary(gateway_small),
        "direct_100k": summary(direct_big),
        "gateway_100k": summary(gateway_big),
    }
    fp = results["first_page"]
    results["gateway_p50_overhead_ratio"] = round(
        (fp["gateway_1k"]["p50_ms"] + fp["gateway_100k"]["p50_ms"])
        / (fp["direct_1k"]["p50_ms"] + fp["direct_100k"]["p50_ms"]),
        3,
    )
    results["big_vs_small_p50_ratio"] = round(fp["direct_100k"]["p50_ms"] / fp["direct_1k"]["p50_ms"], 3)

    sender = session(sender_token)
    results["sends_per_s"] = {
        "direct": round(timed_sends(sender, stack.inbox_url + "/api/v1/messages", small_id, args.sends), 1),
        "gateway": round(timed_sends(sender, stack.gateway_url + "/api/v1/messages", small_id, args.sends), 1),
    }
    return results


def report(results: dict) -> bool:
    """Print the figures and store them; True when every target is met."""
    results["machine"] = machine()
    write_report("mailbox", results)
    fp = results["first_page"]
    print("Mailbox benchmark (sequential client, loopback)")
    print(
        f"  boards seeded: {results['items_small']:,} and {results['items_big']:,} items in {results['seed_seconds']} s"
    )
    print(f"  {'first page (20 items)':<28}{'p50 ms':>10}{'p99 ms':>10}")
    for name, row in fp.items():
        print(f"  {name:<28}{row['p50_ms']:>10.2f}{row['p99_ms']:>10.2f}")
    ratio = results["gateway_p50_overhead_ratio"]
    print(f"  gateway / direct p50: {ratio:.3f}  (target <= 1.25: {'met' if ratio <= 1.25 else 'NOT met'})")
    big = results["big_vs_small_p50_ratio"]
    print(f"  100k / 1k board p50:  {big:.3f}  (target <= 2.0: {'met' if big <= 2.0 else 'NOT met'})")
    sends = results["sends_per_s"]
    print(f"  sends/s direct {sends['direct']}, through gateway {sends['gateway']}")
    return ratio <= 1.25 and big <= 2.0


if __name__ == "__main__":
    sys.exit(main())
