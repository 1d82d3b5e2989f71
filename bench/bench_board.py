"""Message Board benchmark: the folder tree with its counts for a board of 1,000 vs 100,000 items,
and Reply All to a message of 50 recipients vs a plain Reply, all through the gateway.

    python -m bench.bench_board [--items 100000] [--requests 300] [--replies 100]

Starts its own stack (embedded database, private RabbitMQ vhost, free ports).
Baselines are measured in the same run: the 1,000-item board for the 100,000-item one, a plain
Reply (one recipient) for Reply All (50 recipients). The tree's counts are checked against what was
seeded before anything is timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid

import requests

from bench._env import machine, running_stack, write_report
from services.directory.demo import DEMO_PASSWORD
from services.inbox import domain
from services.inbox.board import Board
from services.inbox.store import InboxStore
from services.kit.auth import Identity
from services.kit.crypto import KeyRing, PhiCipher
from services.kit.mongo import database
from services.kit.settings import Env, common_settings
from services.launcher import Stack

PASSWORD = DEMO_PASSWORD
BENCH_STAFF_PASSWORD = "bench-Password-2026"
TREE_TARGET = 2.0
SEED_BATCH = 5000
# Where seeded items land, in turn: messages weigh most, as on a real board.
SEED_FOLDERS = (
    domain.FOLDER_MESSAGES,
    domain.FOLDER_MESSAGES,
    domain.FOLDER_MESSAGES,
    domain.FOLDER_SENT,
    domain.FOLDER_SCHEDULE,
    domain.FOLDER_LAB,
    domain.FOLDER_COMPLIANCE,
    domain.FOLDER_CLOUD,
)
NOTICE_SEVERITIES = ("info", "abnormal", "urgent")
LABEL_NAMES = ("Billing", "Follow-up", "Intake", "Legal", "Supervisor")
RECIPIENTS = 50


def login(base: str, username: str, password: str = PASSWORD) -> tuple[str, str, str]:
    reply = requests.post(f"{base}/api/v1/auth/token", json={"username": username, "password": password}, timeout=10)
    reply.raise_for_status()
    body = reply.json()
    return body["access_token"], body["staff"]["id"], body["staff"]["agency_id"]


def session(token: str) -> requests.Session:
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {token}"
    return s


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(samples: list[float]) -> dict:
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(percentile(samples, 0.99), 3),
        "n": len(samples),
    }


def timed(call, n: int, warmup: int = 10) -> list[float]:
    """Latencies in ms of `n` calls of `call()` (which raises on a failed request), after a warm-up."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def inbox_board(stack: Stack) -> Board:
    """Inbox's board over its own database and PHI cipher, built the way the service builds them."""
    settings = common_settings(Env("inbox", stack.service_env()))
    db = database(settings.mongo_uri, settings.mongo_db)
    return Board(InboxStore(db), PhiCipher(KeyRing(db, settings.phi_master_keys, settings.phi_master_key_id)))


# --- the tree -------------------------------------------------------------------------------------


class Expected:
    """The counts a seeded board must show: per folder and per label, total and unread."""

    def __init__(self):
        self.folders: dict[str, list[int]] = {folder: [0, 0] for folder in domain.ITEM_FOLDERS}
        self.labels: dict[str, list[int]] = {}

    def count(self, counts: dict[str, list[int]], key: str, unread: bool) -> None:
        entry = counts.setdefault(key, [0, 0])
        entry[0] += 1
        entry[1] += int(unread)


def seeded_item(board: Board, agency: str, owner: str, sender: str, n: int, at_ms: int) -> dict:
    """Item `n` of a seeded board: a received or sent message, or a delivered notice; every third
    received one already read."""
    folder = SEED_FOLDERS[n % len(SEED_FOLDERS)]
    unread = folder != domain.FOLDER_SENT and n % 3 != 0
    seal = board.cipher.seal
    if folder in (domain.FOLDER_MESSAGES, domain.FOLDER_SENT):
        ref_id = domain.new_message_id()
        return domain.new_item(
            agency_id=agency,
            owner_id=owner,
            folder=folder,
            kind=domain.KIND_MESSAGE,
            ref_id=ref_id,
            at_ms=at_ms,
            unread=unread,
            urgent=n % 10 == 0,
            message_id=ref_id,
            thread_id=ref_id,
            sender_id=owner if folder == domain.FOLDER_SENT else sender,
            sender_name="Bench Sender",
            recipient_count=1,
            priority="urgent" if n % 10 == 0 else "normal",
            subject=seal(agency, ref_id, "subject", f"Seeded message {n}"),
        )
    ref_id = f"ntc_{uuid.uuid4().hex}"
    return domain.new_item(
        agency_id=agency,
        owner_id=owner,
        folder=folder,
        kind=domain.KIND_NOTICE,
        ref_id=ref_id,
        at_ms=at_ms,
        unread=unread,
        severity=NOTICE_SEVERITIES[n % len(NOTICE_SEVERITIES)],
        title=seal(agency, ref_id, "title", f"Seeded notice {n}"),
    )


def seed_board(board: Board, caller: Identity, sender: str, count: int, labeled: int) -> Expected:
    """Put `count` items on the caller's board through the store (so its counters move as fan-out
    moves them), then label `labeled` of them, spread over the board, through Board.add_label."""
    expected = Expected()
    base_ms = int(time.time() * 1000) - count * 1000
    batch, picked = [], []
    to_label = {i * count // labeled for i in range(min(labeled, count))}
    for n in range(count):
        item = seeded_item(board, caller.agency_id, caller.staff_id, sender, n, base_ms + n * 1000)
        expected.count(expected.folders, item["folder"], bool(item["unread_board"]))
        if n in to_label:
            picked.append(item)
        batch.append(item)
        if len(batch) == SEED_BATCH:
            board.store.insert_board_items(batch)
            batch = []
    board.store.insert_board_items(batch)
    labels = [board.create_label(caller, name) for name in LABEL_NAMES]
    for n, item in enumerate(picked):
        label = labels[n % len(labels)]
        board.add_label(caller, item["_id"], label["id"], None)
        expected.count(expected.labels, label["name"], bool(item["unread_board"]))
    return expected


def check_tree(tree: dict, expected: Expected, who: str) -> None:
    """Stop the benchmark when the tree's counts are not what was seeded."""
    # Folders counted by a feature rather than by the owner's items are not the board's to check.
    shown = {
        f["id"]: [f["total"], f["unread"]] for f in tree["folders"] if f["id"] in expected.folders and "total" in f
    }
    wanted = {folder: counts for folder, counts in expected.folders.items() if folder in shown or any(counts)}
    labels = {label["name"]: [label["total"], label["unread"]] for label in tree["labels"]}
    if shown != wanted or labels != expected.labels:
        raise SystemExit(
            f"{who}: the tree's counts differ from the seeded board\n"
            f"  folders shown {shown}\n  expected      {wanted}\n"
            f"  labels shown  {labels}\n  expected      {expected.labels}"
        )


def tree_latency(stack: Stack, board: Board, args) -> dict:
    admin_token, admin_id, agency = login(stack.gateway_url, "admin")
    small_token, small_id, _ = login(stack.gateway_url, "dr.reyes")
    big_token, big_id, _ = login(stack.gateway_url, "nurse.kim")

    started = time.perf_counter()
    small = seed_board(board, Identity(subject=small_id, agency_id=agency), admin_id, args.small, args.labeled)
    big = seed_board(board, Identity(subject=big_id, agency_id=agency), admin_id, args.items, args.labeled)
    seed_s = time.perf_counter() - started

    url = stack.gateway_url + "/api/v1/board"
    small_session, big_session = session(small_token), session(big_token)
    check_tree(small_session.get(url, timeout=10).json(), small, "1k board")
    check_tree(big_session.get(url, timeout=10).json(), big, "100k board")

    def get(s: requests.Session):
        return lambda: s.get(url, timeout=10).raise_for_status()

    # Interleave the two boards so machine noise hits both alike.
    small_samples, big_samples = [], []
    for _ in range(3):
        small_samples += timed(get(small_session), args.requests // 3)
        big_samples += timed(get(big_session), args.requests // 3)
    result = {
        "seed_seconds": round(seed_s, 1),
        "items_small": args.small,
        "items_big": args.items,
        "labeled_items_per_board": args.labeled,
        "labels_per_board": len(LABEL_NAMES),
        "checked_counts_100k": {"folders": big.folders, "labels": big.labels},  # [total, unread]
        "tree_1k": summary(small_samples),
        "tree_100k": summary(big_samples),
    }
    result["tree_100k_vs_1k_p50_ratio"] = round(result["tree_100k"]["p50_ms"] / result["tree_1k"]["p50_ms"], 3)
    return result


# --- replies --------------------------------------------------------------------------------------


def fifty_colleagues(stack: Stack, admin: requests.Session, admin_id: str, must_include: str) -> list[str]:
    """RECIPIENTS active staff of the admin's agency other than the admin (creating bench staff
    through the directory admin API when there are fewer), `must_include` among them."""
    directory = stack.gateway_url + "/api/v1/directory/staff"
    listed = admin.get(directory, timeout=10).json()["staff"]
    staff = [s["id"] for s in listed if s["active"] and s["id"] != admin_id]
    for n in range(RECIPIENTS - len(staff)):
        body = {
            "username": f"bench.staff{n:02d}",
            "display_name": f"Bench Staff {n:02d}",
            "password": BENCH_STAFF_PASSWORD,
        }
        reply = admin.post(directory, json=body, timeout=10)
        reply.raise_for_status()
        staff.append(reply.json()["id"])
    others = [staff_id for staff_id in staff if staff_id != must_include]
    return [must_include, *others[: RECIPIENTS - 1]]


def reply_latency(stack: Stack, args) -> dict:
    admin_token, admin_id, _ = login(stack.gateway_url, "admin")
    replier_token, replier_id, _ = login(stack.gateway_url, "dr.chen")
    admin = session(admin_token)
    recipients = fifty_colleagues(stack, admin, admin_id, replier_id)
    original = admin.post(
        stack.gateway_url + "/api/v1/messages",
        json={"to_staff_ids": recipients, "subject": "Bench thread", "body": "Fifty colleagues"},
        timeout=10,
    )
    original.raise_for_status()
    base = f"{stack.gateway_url}/api/v1/messages/{original.json()['id']}"
    replier = session(replier_token)
    expected = {"reply": {admin_id}, "reply-all": {admin_id, *recipients} - {replier_id}}

    def post(route: str):
        def call():
            reply = replier.post(f"{base}/{route}", json={"body": "Noted, thanks."}, timeout=30)
            reply.raise_for_status()
            got = set(reply.json()["recipient_ids"])
            if got != expected[route]:
                raise SystemExit(f"{route} reached {len(got)} recipients, expected {len(expected[route])}")

        return call

    one, all_ = [], []
    for _ in range(4):
        all_ += timed(post("reply-all"), args.replies // 4, warmup=2)
        one += timed(post("reply"), args.replies // 4, warmup=2)
    result = {
        "reply_all_recipients": len(expected["reply-all"]),
        "reply_1": summary(one),
        "reply_all_50": summary(all_),
    }
    result["reply_all_vs_reply_p50_ratio"] = round(result["reply_all_50"]["p50_ms"] / result["reply_1"]["p50_ms"], 3)
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--labeled", type=int, default=300)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--replies", type=int, default=100)
    args = parser.parse_args()

    with running_stack("board") as stack:
        results = tree_latency(stack, inbox_board(stack), args)
        results.update(reply_latency(stack, args))
    return 0 if report(results) else 1


def report(results: dict) -> bool:
    """Print the figures and store them; True when the tree target is met."""
    results["machine"] = machine()
    write_report("board", results)
    print("Message Board benchmark (sequential client, through the gateway, loopback)")
    print(
        f"  boards seeded: {results['items_small']:,} and {results['items_big']:,} items "
        f"({results['labeled_items_per_board']} labeled) in {results['seed_seconds']} s; counts checked"
    )
    print(f"  {'request':<34}{'p50 ms':>10}{'p99 ms':>10}")
    rows = {
        "GET /board, 1k items": results["tree_1k"],
        "GET /board, 100k items": results["tree_100k"],
        "reply (1 recipient)": results["reply_1"],
        f"reply-all ({results['reply_all_recipients']} recipients)": results["reply_all_50"],
    }
    for name, row in rows.items():
        print(f"  {name:<34}{row['p50_ms']:>10.2f}{row['p99_ms']:>10.2f}")
    tree = results["tree_100k_vs_1k_p50_ratio"]
    verdict = "met" if tree <= TREE_TARGET else "NOT met"
    print(f"  tree 100k / 1k p50:        {tree:.3f}  (target <= {TREE_TARGET}: {verdict})")
    print(f"  reply-all / reply p50:     {results['reply_all_vs_reply_p50_ratio']:.3f}")
    return tree <= TREE_TARGET


if __name__ == "__main__":
    sys.exit(main())
