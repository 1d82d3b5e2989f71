"""Announcement benchmark: the time to post an announcement to an agency of 10 staff vs 10,000.

    python -m bench.bench_announcements [--large 10000] [--posts 200] [--earlier 5]

An announcement is stored once for its agency, so posting resolves no staff and writes one
document: the agency's size should not matter. To make that a fair test, both agencies carry
realistic per-staff read-state documents of earlier announcements (every staff member has read
and acknowledged each of them), so the large agency's database really is 1,000 times bigger.
Also reported: the folder's unread count for one staff member of each agency, with a handful of
active announcements and with the bounded maximum it looks at (announcements.ACTIVE_LIMIT; its
cost follows the number of active announcements, not the agency's size), and the documents
written and staff resolutions per post. Runs in-process against its own embedded database.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import time

from bench._env import embedded_mongo, machine, write_report
from services.inbox import announcements, config, domain
from services.inbox.board import Board
from services.inbox.components import Components
from services.inbox.directory_client import Resolution
from services.inbox.mailbox import Mailbox
from services.inbox.store import InboxStore
from services.kit.auth import Identity, current_identity
from services.kit.crypto import KeyRing, PhiCipher
from services.kit.mongo import database, now_ms

SMALL, LARGE = "agy_small", "agy_large"
TARGET_RATIO = 1.5


class Directory:
    """Directory's answer for the caller's agency, counting how often posting asks for it."""

    def __init__(self, staff: dict[str, list[str]]):
        self.staff = staff
        self.resolutions = 0

    def resolve(self, addressing: domain.Addressing) -> Resolution:
        self.resolutions += 1
        identity = current_identity.get()
        return Resolution(list(self.staff.get(identity.agency_id if identity else "", [])), [], [])


def build(mongo_uri: str, directory: Directory) -> announcements.Announcements:
    db = database(mongo_uri, "bench_announcements")
    store = InboxStore(db)
    store.ensure_indexes()
    cipher = PhiCipher(KeyRing(db, {"m": os.urandom(32)}, "m"))
    board = Board(store, cipher)
    mailbox = Mailbox(store, cipher, directory.resolve, board)
    master = base64.b64encode(os.urandom(32)).decode()
    settings = config.load({"MONGO_URI": mongo_uri, "PHI_MASTER_KEYS": f"m:{master}"})
    feature = announcements.Announcements(Components(settings, store, cipher, board, mailbox, directory))
    feature.ensure_indexes()
    feature.attach()
    return feature


def admin(agency: str) -> Identity:
    return Identity(subject=f"stf_{agency}_admin", agency_id=agency, roles=frozenset({"staff", "admin"}), name="Admin")


def seed(feature: announcements.Announcements, agency: str, staff_ids: list[str], earlier: int) -> None:
    """Earlier announcements, each read and acknowledged by every staff member (as the API leaves them)."""
    for n in range(earlier):
        posted = feature.post(admin(agency), f"Earlier notice {n}", "Seeded body", ack_required=True)
        at = now_ms()
        batch = []
        for staff_id in staff_ids:
            batch.append(
                {
                    "_id": announcements.state_id(posted["id"], staff_id),
                    "announcement_id": posted["id"],
                    "agency_id": agency,
                    "staff_id": staff_id,
                    "read_at": at,
                    "acknowledged_at": at,
                    "ack_key": posted["id"],
                }
            )
            if len(batch) == 5000:
                feature.states.insert_many(batch, ordered=False)
                batch = []
        if batch:
            feature.states.insert_many(batch, ordered=False)


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return (time.perf_counter() - start) * 1000


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 3),
        "n": len(samples),
    }


def document_count(feature: announcements.Announcements) -> int:
    return sum(feature.db[name].count_documents({}) for name in feature.db.list_collection_names())


def run(feature: announcements.Announcements, directory: Directory, args) -> dict:
    started = time.perf_counter()
    for agency in (SMALL, LARGE):
        seed(feature, agency, directory.staff[agency], args.earlier)
    results = {
        "staff_small": args.small,
        "staff_large": args.large,
        "earlier_announcements": args.earlier,
        "seed_seconds": round(time.perf_counter() - started, 1),
    }
    for agency in (SMALL, LARGE):  # warm caches and data keys
        feature.post(admin(agency), "Warm-up", "Warm-up body")
    results["unread_count_few_active"] = unread_counts(feature, directory, args.counts)

    writes: dict[str, int] = {}
    posts: dict[str, list[float]] = {SMALL: [], LARGE: []}
    directory.resolutions = 0
    for agency in (SMALL, LARGE):
        before = document_count(feature)
        feature.post(admin(agency), "Counted", "Counted body", ack_required=True)
        writes[agency] = document_count(feature) - before
    # Interleaved so machine noise hits both agencies alike.
    for n in range(args.posts):
        for agency in (SMALL, LARGE):
            body = f"Announcement body {n}"
            posts[agency].append(timed(feature.post, admin(agency), f"Notice {n}", body, ack_required=n % 2 == 0))
    results["staff_resolutions_while_posting"] = directory.resolutions
    results["documents_written_per_post"] = {"small": writes[SMALL], "large": writes[LARGE]}
    results["post"] = {"small": summary(posts[SMALL]), "large": summary(posts[LARGE])}
    results["large_vs_small_post_p50_ratio"] = round(
        results["post"]["large"]["p50_ms"] / results["post"]["small"]["p50_ms"], 3
    )

    results["unread_count_bound_active"] = unread_counts(feature, directory, args.counts)
    return results


def unread_counts(feature: announcements.Announcements, directory: Directory, n: int) -> dict:
    """The folder's unread count for one staff member of each agency, and how many announcements it saw."""
    samples: dict[str, list[float]] = {SMALL: [], LARGE: []}
    for _ in range(n):
        for agency in (SMALL, LARGE):
            reader = Identity(subject=directory.staff[agency][-1], agency_id=agency)
            samples[agency].append(timed(feature.unread_count, reader))
    active = min(announcements.ACTIVE_LIMIT, feature.announcements.count_documents({"active_key": {"$eq": SMALL}}))
    return {"active_announcements": active, "small": summary(samples[SMALL]), "large": summary(samples[LARGE])}


def report(results: dict) -> bool:
    """Print the figures and store them; True when the target is met."""
    results["machine"] = machine()
    write_report("announcements", results)
    print("Announcement benchmark (in-process, embedded database)")
    print(
        f"  agencies of {results['staff_small']:,} and {results['staff_large']:,} staff, each with "
        f"{results['earlier_announcements']} earlier announcements read by everyone "
        f"(seeded in {results['seed_seconds']} s)"
    )
    print(f"  {'':<36}{'p50 ms':>10}{'p99 ms':>10}")
    for name in ("small", "large"):
        row = results["post"][name]
        print(f"  {'post, ' + name + ' agency':<36}{row['p50_ms']:>10.2f}{row['p99_ms']:>10.2f}")
    for key in ("unread_count_few_active", "unread_count_bound_active"):
        active = results[key]["active_announcements"]
        for name in ("small", "large"):
            row = results[key][name]
            label = f"unread count, {name} ({active} active)"
            print(f"  {label:<36}{row['p50_ms']:>10.2f}{row['p99_ms']:>10.2f}")
    writes = results["documents_written_per_post"]
    print(f"  documents written per post: small {writes['small']}, large {writes['large']}")
    print(f"  staff resolutions while posting: {results['staff_resolutions_while_posting']}")
    ratio = results["large_vs_small_post_p50_ratio"]
    met = ratio <= TARGET_RATIO
    print(f"  large / small post p50: {ratio:.3f}  (target <= {TARGET_RATIO}: {'met' if met else 'NOT met'})")
    return met


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=10)
    parser.add_argument("--large", type=int, default=10_000)
    parser.add_argument("--earlier", type=int, default=5)
    parser.add_argument("--posts", type=int, default=200)
    parser.add_argument("--counts", type=int, default=200)
    args = parser.parse_args()
    directory = Directory(
        {
            SMALL: [f"stf_small_{n:05d}" for n in range(args.small)],
            LARGE: [f"stf_large_{n:05d}" for n in range(args.large)],
        }
    )
    with embedded_mongo() as mongo_uri:
        results = run(build(mongo_uri, directory), directory, args)
    return 0 if report(results) else 1


if __name__ == "__main__":
    sys.exit(main())
