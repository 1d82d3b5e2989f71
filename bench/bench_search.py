"""Search across a Message Board on nx-27017: typical queries on a board of 100,000 items against
the board's first page (the baseline, same run), and what indexing adds to a send.

    python -m bench search                      # or: python -m bench.bench_search [--items 100000]

Runs in-process against its own embedded database (no stack), through the inbox's own build():
seeds one board of `items` items over about two years (one every ten minutes; 60 % staff messages
with sealed subjects and bodies, a fifth of them about a patient, 40 % delivered notices), their
messages, and their postings (computed by SearchIndex.postings_of, as the indexer computes them;
inserted in bulk, as a fresh index can be), then times, interleaved:
- the board's first page (Messages, 20 items): the baseline;
- a rare word (in 30 items), two common words, a sender and a word, a patient by name; each also
  looks among the agency's 40 active announcements (posted before, one holding the rare word);
and then sends with and without the indexing hook (one recipient), and the indexer's job for them.
Target: every query's p50 under 300 ms.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import statistics
import sys
import tempfile
import time
import uuid

from bench._env import embedded_mongo, machine, write_report
from services.inbox import config, domain, search
from services.inbox.announcements import Announcements
from services.inbox.board import ItemFilter
from services.inbox.directory_client import Resolution
from services.inbox.search import POSTINGS, Query, Search
from services.inbox.service import build
from services.kit.auth import Identity, current_identity
from services.kit.mongo import database, now_ms

AGENCY = "agy_bench"
OWNER = "stf_owner"
SENDERS = [f"stf_s{n:02d}" for n in range(20)]
TARGET_MS = 300.0
SPACING_MS = 600_000  # one item every ten minutes: 100,000 items over about two years
RARE = "zolpidem"
RARE_COUNT = 30
ANNOUNCEMENTS = 40  # active announcements of the agency
FIRST = ("Ana", "Ben", "Carla", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas")
LAST = ("Smith", "Lopez", "Okafor", "Nguyen", "Kowalski", "Haddad", "Moreau", "Tanaka", "Silva", "Berg")
CLINICAL = (
    "patient follow appointment refill medication dose lab result review plan intake note call back "
    "schedule therapy session insurance prior authorization chart signature discharge referral "
    "blood pressure glucose insulin anxiety depression assessment consent form family pharmacy"
).split()


class Everyone:
    """Directory stood in for: every staff id named exists."""

    def resolve(self, addressing: domain.Addressing) -> Resolution:
        return Resolution(list(addressing.staff_ids), [], [])


def vocabulary(size: int = 4000) -> tuple[list[str], list[float]]:
    """Clinical words first, then made-up ones, Zipf-weighted (the first words are the most common)."""
    made = [f"w{n:04d}" for n in range(size - len(CLINICAL))]
    words = [*CLINICAL, *made]
    weights = [1.0 / (rank + 1) ** 1.05 for rank in range(len(words))]
    return words, weights


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(samples: list[float]) -> dict:
    return {
        "p50_ms": round(statistics.median(samples), 2),
        "p95_ms": round(percentile(samples, 0.95), 2),
        "n": len(samples),
    }


def seed(components, finder: Search, count: int, rng: random.Random) -> dict:
    """The board, its messages and its postings; returns what was seeded."""
    words, weights = vocabulary()
    seal = components.cipher.seal
    store = components.store
    rare_at = {n * count // RARE_COUNT + 7 for n in range(RARE_COUNT)}
    start_ms = now_ms() - count * SPACING_MS
    items: list[dict] = []
    messages: list[dict] = []
    pending: dict[tuple[str, int], dict[str, int]] = {}
    postings = store.db[POSTINGS]
    posting_docs = 0
    patients_named: dict[str, int] = {}

    def flush(below_bk: int | None) -> int:
        """Insert the finished posting documents (all of them when below_bk is None)."""
        done = [key for key in pending if below_bk is None or key[1] < below_bk]
        docs = [{"_id": search.doc_id(pk, bk), "pk": pk, "bk": bk, **pending.pop((pk, bk))} for pk, bk in done]
        for start in range(0, len(docs), 5000):
            postings.insert_many(docs[start : start + 5000], ordered=False)
        return len(docs)

    def write_batch() -> int:
        if messages:
            store.messages.insert_many(messages, ordered=False)
        store.insert_board_items(items)
        for key, fields in finder.index.postings_of(items).items():
            pending.setdefault(key, {}).update(fields)
        written = flush(search.bucket(items[-1]["sent_at"]))
        items.clear()
        messages.clear()
        return written

    for n in range(count):
        at = start_ms + n * SPACING_MS
        text = rng.choices(words, weights, k=rng.randint(12, 40))
        if n in rare_at:
            text.append(RARE)
        kind = n % 10
        if kind < 6:
            folder = domain.FOLDER_SENT if kind == 5 else domain.FOLDER_MESSAGES
            mid = domain.new_message_id()
            sender = OWNER if folder == domain.FOLDER_SENT else SENDERS[n % len(SENDERS)]
            subject = " ".join(text[:5]).capitalize()
            message = {
                "_id": mid,
                "kind": domain.KIND_MESSAGE,
                "agency_id": AGENCY,
                "thread_id": mid,
                "sender_id": sender,
                "sender_name": sender,
                "recipient_ids": [OWNER],
                "priority": "urgent" if n % 17 == 0 else "normal",
                "subject": seal(AGENCY, mid, "subject", subject),
                "body": seal(AGENCY, mid, "body", " ".join(text[5:])),
                "sent_at": at,
            }
            if n % 5 == 0:
                name = f"{FIRST[n % 10]} {LAST[(n // 10) % 10]}"
                patients_named[name] = patients_named.get(name, 0) + 1
                message["patient_id"] = f"pat_{n % 100:03d}"
                message["patient_name"] = seal(AGENCY, mid, "patient_name", name)
            messages.append(message)
            items.append(
                {
                    **domain.board_item(message, OWNER, folder),
                    **({"read_at": at, "unread_board": None} if n % 3 == 0 and folder != domain.FOLDER_SENT else {}),
                }
            )
        else:
            ref = f"ntc_{uuid.uuid4().hex}"
            folder = (domain.FOLDER_LAB, domain.FOLDER_SCHEDULE, domain.FOLDER_COMPLIANCE, domain.FOLDER_CLOUD)[
                kind - 6
            ]
            items.append(
                domain.new_item(
                    agency_id=AGENCY,
                    owner_id=OWNER,
                    folder=folder,
                    kind=domain.KIND_NOTICE,
                    ref_id=ref,
                    at_ms=at,
                    unread=n % 3 != 0,
                    sender_id="notifications",
                    title=seal(AGENCY, ref, "title", " ".join(text[:6]).capitalize()),
                    summary=seal(AGENCY, ref, "summary", " ".join(text[6:])),
                )
            )
        if len(items) == 2000:
            posting_docs += write_batch()
            if n % 20_000 < 2000:
                print(f"  seeded {n + 1:,} items, {posting_docs:,} posting documents", file=sys.stderr, flush=True)
    if items:
        posting_docs += write_batch()
    posting_docs += flush(None)
    patient = max(patients_named, key=patients_named.get)
    return {
        "items": count,
        "posting_documents": posting_docs,
        "patient": patient,
        "patient_items": patients_named[patient],
    }


def announce(components, rng: random.Random) -> int:
    """ANNOUNCEMENTS active announcements in the agency (every query also looks among them), one
    holding the rare word."""
    feature = next(f for f in components.features if isinstance(f, Announcements))
    admin = Identity(subject="stf_admin", agency_id=AGENCY, roles=frozenset({"staff", "admin"}), name="Admin")
    words, weights = vocabulary()
    token = current_identity.set(admin)
    try:
        for n in range(ANNOUNCEMENTS):
            body = " ".join(rng.choices(words, weights, k=40)) + (f" {RARE}" if n == 0 else "")
            feature.post(admin, " ".join(rng.choices(words, weights, k=6)), body)
    finally:
        current_identity.reset(token)
    return ANNOUNCEMENTS


def timed(call, n: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def query_latency(components, finder: Search, seeded: dict, rounds: int) -> dict:
    owner = Identity(subject=OWNER, agency_id=AGENCY, roles=frozenset({"staff"}))
    queries = {
        "rare word": Query(words=(RARE,)),
        "two common words": Query(words=("patient", "follow")),
        "sender + word": Query(words=("refill",), sender_id=SENDERS[3]),
        "patient by name": Query(patient=seeded["patient"]),
        "word, unread only": Query(words=("insulin",), unread=True),
    }
    found = {name: len(finder.search(owner, query, None, 20)["items"]) for name, query in queries.items()}
    if len(finder.search(owner, queries["rare word"], None, 20)["announcements"]) != 1:
        raise SystemExit("the announcement holding the rare word was not found")
    if found["rare word"] != min(20, RARE_COUNT) or found["patient by name"] != min(20, seeded["patient_items"]):
        raise SystemExit(f"unexpected results: {found}")
    samples: dict[str, list[float]] = {"board first page (baseline)": [], **{name: [] for name in queries}}
    for _ in range(4):  # interleaved, so machine noise hits all alike
        samples["board first page (baseline)"] += timed(
            lambda: components.board.page(owner, "messages", ItemFilter(), None, 20), rounds
        )
        for name, query in queries.items():
            samples[name] += timed(lambda query=query: finder.search(owner, query, None, 20), rounds)
    return {"found": found, "latency": {name: summary(values) for name, values in samples.items()}}


def send_cost(components, finder: Search, n: int) -> dict:
    """A send to one colleague with and without the indexing hook, and the indexer's job per send."""
    sender = Identity(subject=SENDERS[0], agency_id=AGENCY, roles=frozenset({"staff"}), name="Bench")
    words, weights = vocabulary()
    rng = random.Random(7)

    def send():
        draft = domain.Draft(
            domain.Addressing(staff_ids=(OWNER,)),
            " ".join(rng.choices(words, weights, k=5)),
            " ".join(rng.choices(words, weights, k=30)),
        )
        token = current_identity.set(sender)
        try:
            components.mailbox.send(sender, draft)
        finally:
            current_identity.reset(token)

    hook = components.store.on_items
    with_hook, without, jobs = [], [], []
    for _ in range(4):
        components.store.on_items = None
        without += timed(send, n // 4, warmup=1)
        components.store.on_items = hook
        with_hook += timed(send, n // 4, warmup=1)
        started = time.perf_counter()
        done = finder.index.run_pending(limit=1000)
        jobs.append((time.perf_counter() - started) * 1000 / max(done, 1))
    return {
        "send_without_index": summary(without),
        "send_with_index": summary(with_hook),
        "indexer_ms_per_send": summary(jobs),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--sends", type=int, default=100)
    args = parser.parse_args()
    rng = random.Random(2026)
    with embedded_mongo() as uri, tempfile.TemporaryDirectory(prefix="bench-search-") as run_dir:
        master = base64.b64encode(os.urandom(32)).decode()
        settings = config.load({"MONGO_URI": uri, "PHI_MASTER_KEYS": f"m:{master}", "CLINIC_RUN_DIR": run_dir})
        inbox = build(
            settings, database(uri, "bench_inbox"), directory=Everyone(), features=(Search, Announcements)
        )
        components = inbox.components
        finder = components.features[0]
        hook, components.store.on_items = components.store.on_items, None  # seeding indexes in bulk
        started = time.perf_counter()
        seeded = seed(components, finder, args.items, rng)
        seeded["seed_seconds"] = round(time.perf_counter() - started, 1)
        components.store.on_items = hook
        seeded["announcements"] = announce(components, rng)
        results = {**seeded, **query_latency(components, finder, seeded, args.rounds)}
        results.update(send_cost(components, finder, args.sends))
    return 0 if report(results) else 1


def report(results: dict) -> bool:
    results["machine"] = machine()
    write_report("search", results)
    print("Search benchmark (in-process, nx-27017)")
    print(
        f"  board: {results['items']:,} items, {results['posting_documents']:,} posting documents, "
        f"seeded in {results['seed_seconds']} s"
    )
    print(f"  {'query':<32}{'found':>7}{'p50 ms':>10}{'p95 ms':>10}")
    met = True
    for name, row in results["latency"].items():
        found = results["found"].get(name, "")
        print(f"  {name:<32}{found!s:>7}{row['p50_ms']:>10.2f}{row['p95_ms']:>10.2f}")
        if name in results["found"]:
            met = met and row["p50_ms"] < TARGET_MS
    for name in ("send_without_index", "send_with_index", "indexer_ms_per_send"):
        row = results[name]
        print(f"  {name.replace('_', ' '):<32}{'':>7}{row['p50_ms']:>10.2f}{row['p95_ms']:>10.2f}")
    print(f"  every query p50 < {TARGET_MS:.0f} ms: {'met' if met else 'NOT met'}")
    return met


if __name__ == "__main__":
    sys.exit(main())
