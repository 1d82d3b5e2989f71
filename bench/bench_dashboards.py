"""Dashboards benchmark: an agency whose busiest board holds 100,000 items; the admin's dashboards
(summary, the staff backlog table, its CSV) against the folder tree of that board, in the same run,
through the gateway.

    python -m bench.bench_dashboards [--items 100000] [--requests 150]

Starts its own stack (embedded database, private RabbitMQ vhost, free ports). The board is seeded
straight into inbox's database through its store (counters move as fan-out moves them) and the
dashboards' unread-age aggregates are moved by the same deltas, as the running service moves them;
30 days of response times are seeded as first reads and replies would have recorded them. The
dashboard's backlog for the seeded board is checked against what was seeded before anything is
timed. The dashboards read aggregates only, so their cost follows the agency's staff, not its items:
the figure that matters is their p50 over the tree's (the tree is two primary-key reads).
"""

from __future__ import annotations

import argparse
import random
import time
from types import SimpleNamespace

from pymongo.errors import PyMongoError

from bench._env import machine, running_stack, write_report
from bench.bench_board import inbox_board, login, seeded_item, session, summary, timed
from services.inbox import dashboards, domain
from services.inbox.board import Board
from services.launcher import Stack

SEED_BATCH = 1000
TIMES_SEEDED = 3000
# A dashboard within this many times the tree's p50 (both small next to a page of items).
RATIO_TARGET = 5.0


def aggregates_of(board: Board) -> dashboards.Dashboards:
    """The dashboards' aggregate writers over the bench's connection to inbox's database (no hooks:
    the bench calls them where the service's hooks would)."""
    parts = SimpleNamespace(store=board.store, settings=SimpleNamespace(dashboard_consumers=""), mailbox=None)
    return dashboards.Dashboards(parts)


def seed(board: Board, aggregates: dashboards.Dashboards, agency: str, owner: str, sender: str, count: int) -> int:
    """`count` items on `owner`'s board; returns how many are unread and waiting in the dashboard's folders."""
    base_ms = int(time.time() * 1000) - count * 1000
    waiting, batch = 0, []
    for n in range(count):
        item = seeded_item(board, agency, owner, sender, n, base_ms + n * 1000)
        waiting += int(bool(item["unread_board"]) and item["folder"] in dashboards.STAFF_FOLDERS)
        batch.append(item)
        if len(batch) == SEED_BATCH or n == count - 1:
            insert(board, batch)
            board.store.apply_deltas([(item, domain.counter_delta(None, item)) for item in batch])
            aggregates.move_unread([(item, domain.counter_delta(None, item)) for item in batch])
            batch = []
    return waiting


def insert(board: Board, batch: list[dict], attempts: int = 5) -> None:
    """Insert a batch of new items (fresh ids), again when a busy server's heartbeat cut the call off:
    inserts are repeatable, so every item of the batch is on the board once when this returns (and
    counted by the caller, once)."""
    for attempt in range(attempts):
        try:
            board.store.insert_board_items(batch, count=False)  # counted once it is all in
            return
        except PyMongoError:
            if attempt == attempts - 1:
                raise
            time.sleep(1)


def seed_times(aggregates: dashboards.Dashboards, agency: str, staff_ids: list[str]) -> None:
    """30 days of first reads and replies, as the service's hooks record them."""
    rng = random.Random(7)
    now = int(time.time() * 1000)
    for _ in range(TIMES_SEEDED):
        at = now - rng.randrange(30 * dashboards.DAY_MS)
        metric = rng.choice((dashboards.METRIC_FIRST_READ, dashboards.METRIC_REPLY))
        aggregates._add_time(agency, rng.choice(staff_ids), metric, at, rng.lognormvariate(7, 1.5))  # noqa: SLF001


def run(stack: Stack, args) -> dict:
    admin_token, admin_id, agency = login(stack.gateway_url, "admin")
    big_token, big_id, _ = login(stack.gateway_url, "nurse.kim")
    board = inbox_board(stack)
    aggregates = aggregates_of(board)
    admin, big = session(admin_token), session(big_token)

    started = time.perf_counter()
    waiting = seed(board, aggregates, agency, big_id, admin_id, args.items)
    staff = [
        row["staff_id"] for row in admin.get(f"{stack.gateway_url}/api/v1/dashboards/staff", timeout=30).json()["staff"]
    ]
    seed_times(aggregates, agency, staff)
    seed_s = time.perf_counter() - started

    row = next(
        r
        for r in admin.get(f"{stack.gateway_url}/api/v1/dashboards/staff", timeout=30).json()["staff"]
        if r["staff_id"] == big_id
    )
    if row["waiting"] != waiting or row["oldest_unread_at"] is None:
        raise SystemExit(f"the dashboard shows {row['waiting']} waiting on the seeded board, {waiting} were seeded")

    urls = {
        "tree": (big, f"{stack.gateway_url}/api/v1/board"),
        "summary": (admin, f"{stack.gateway_url}/api/v1/dashboards/summary?days=30"),
        "staff": (admin, f"{stack.gateway_url}/api/v1/dashboards/staff?days=30"),
        "staff_csv": (admin, f"{stack.gateway_url}/api/v1/dashboards/staff?days=30&format=csv"),
    }

    def get(name: str):
        client, url = urls[name]
        return lambda: client.get(url, timeout=30).raise_for_status()

    samples: dict[str, list[float]] = {name: [] for name in urls}
    for _ in range(3):  # interleaved, so machine noise hits all alike
        for name in urls:
            samples[name] += timed(get(name), args.requests // 3, warmup=3)
    result = {
        "seed_seconds": round(seed_s, 1),
        "items_on_board": args.items,
        "waiting_on_board": waiting,
        "staff_in_agency": len(staff),
        "response_times_seeded": TIMES_SEEDED,
    }
    for name, values in samples.items():
        result[name] = summary(values)
    tree = result["tree"]["p50_ms"]
    for name in ("summary", "staff", "staff_csv"):
        result[f"{name}_vs_tree_p50_ratio"] = round(result[name]["p50_ms"] / tree, 3)
    return result


def report(results: dict) -> bool:
    results["machine"] = machine()
    write_report("dashboards", results)
    print("Dashboards benchmark (sequential client, through the gateway, loopback)")
    print(
        f"  board seeded: {results['items_on_board']:,} items ({results['waiting_on_board']:,} waiting), "
        f"{results['staff_in_agency']} staff, {results['response_times_seeded']:,} response times, "
        f"in {results['seed_seconds']} s; backlog checked"
    )
    print(f"  {'request':<44}{'p50 ms':>10}{'p99 ms':>10}")
    names = {
        "tree": "GET /board (100k-item board)",
        "summary": "GET /dashboards/summary?days=30",
        "staff": "GET /dashboards/staff?days=30",
        "staff_csv": "GET /dashboards/staff?days=30&format=csv",
    }
    for key, name in names.items():
        print(f"  {name:<44}{results[key]['p50_ms']:>10.2f}{results[key]['p99_ms']:>10.2f}")
    worst = max(results[f"{n}_vs_tree_p50_ratio"] for n in ("summary", "staff", "staff_csv"))
    for n in ("summary", "staff", "staff_csv"):
        print(f"  {n} / tree p50: {results[f'{n}_vs_tree_p50_ratio']:.3f}")
    verdict = "met" if worst <= RATIO_TARGET else "NOT met"
    print(f"  worst dashboard / tree p50: {worst:.3f} (target <= {RATIO_TARGET}: {verdict})")
    return worst <= RATIO_TARGET


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=150)
    args = parser.parse_args()
    with running_stack("dashboards") as stack:
        results = run(stack, args)
    return 0 if report(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
