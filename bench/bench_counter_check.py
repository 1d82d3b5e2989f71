"""Counter drift check and counted fan-out on nx-27017: what a drift check pass costs per board and
per pass, and what counting a send once per pass (tokens) costs against counting it per insert.

    python -m bench.bench_counter_check [--boards 200] [--items 250] [--big 20000] [--sends 200]

Runs in-process against its own embedded database (no stack). Seeds `boards` boards of `items`
visible items each (spread over folders, some unread, some labelled) and one board of `big` items,
with exact counters; corrupts a few; then times:
- one board observed (counters, a recount of only the fields a count needs, counters again);
- drift check passes with the default settings (100 boards, 50,000 items at most), until every
  corrupted board was repaired (each needs two sightings);
- sends of 1 and 50 recipients: the fan-out as it runs now (insert marked items, one guarded $inc
  per board with the pass's token, release) against the same writes counted per insert, and the
  later sweep of the tokens.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
import time
from functools import partial

from bench._env import embedded_mongo, machine, write_report
from services.inbox import config, domain
from services.inbox.counter_check import CounterCheck
from services.inbox.directory_client import Resolution
from services.inbox.service import build
from services.kit.auth import Identity
from services.kit.mongo import database, now_ms

AGENCY = "agy_bench"
FOLDERS = (
    domain.FOLDER_MESSAGES,
    domain.FOLDER_MESSAGES,
    domain.FOLDER_SENT,
    domain.FOLDER_LAB,
    domain.FOLDER_SCHEDULE,
)
CORRUPTED = 5


class Everyone:
    """Directory stood in for: every staff id named exists."""

    def resolve(self, addressing: domain.Addressing) -> Resolution:
        return Resolution(list(addressing.staff_ids), [], [])

    def agency_settings(self, agency_id):  # pragma: no cover - not asked here
        raise NotImplementedError


def components_on(uri: str, run_dir: str):
    master = base64.b64encode(os.urandom(32)).decode()
    settings = config.load({"MONGO_URI": uri, "PHI_MASTER_KEYS": f"m:{master}", "CLINIC_RUN_DIR": run_dir})
    return build(settings, database(uri, "bench_inbox"), directory=Everyone(), features=()).components


def seed_board(store, owner: str, count: int) -> None:
    at = now_ms() - count * 1000
    items = []
    for n in range(count):
        folder = FOLDERS[n % len(FOLDERS)]
        item = domain.new_item(
            agency_id=AGENCY,
            owner_id=owner,
            folder=folder,
            kind=domain.KIND_MESSAGE,
            ref_id=f"msg_seed_{owner}_{n}",
            at_ms=at + n,
            unread=n % 3 == 0 and folder != domain.FOLDER_SENT,
        )
        if n % 10 == 0:
            item["labels"] = {"lbl_bench": at}
        items.append(item)
    for start in range(0, len(items), 5000):
        store.insert_board_items(items[start : start + 5000])  # counted


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def send_cost(components, recipients: int, sends: int) -> dict:
    """Median seconds per send's writes (message, items, counters, release) as the fan-out does them
    now (items marked, one token-guarded $inc per board), against the same writes counted per
    insert; and the later sweep of the tokens, per send."""
    sender = Identity(subject="stf_sender", agency_id=AGENCY, name="Sender")
    to = [f"stf_to_{n}" for n in range(recipients)]
    mailbox, store = components.mailbox, components.store

    def message() -> dict:
        draft = domain.Draft(domain.Addressing(staff_ids=tuple(to)), "Bench", "Body")
        return mailbox.compose(sender, draft, to, domain.new_message_id())

    def by_pass(doc: dict) -> None:
        store.insert_message(doc)
        mailbox.complete_fanout(doc)

    def per_insert(doc: dict) -> None:
        store.insert_message(doc)
        items = [domain.board_item(doc, s, domain.FOLDER_MESSAGES) for s in to]
        store.insert_board_items([*items, domain.board_item(doc, sender.staff_id, domain.FOLDER_SENT)])
        store.messages.update_one({"_id": doc["_id"]}, {"$unset": {"fanout_pending_at": ""}, "$set": {"_outbox_at": 1}})

    counted = [timed(partial(by_pass, message())) for _ in range(sends)]
    sweep = timed(lambda: mailbox.fanout.sweep_counted(older_than_ms=now_ms(), limit=sends))
    plain = [timed(partial(per_insert, message())) for _ in range(sends)]
    return {
        "recipients": recipients,
        "send_ms_counted_by_pass": round(statistics.median(counted) * 1000, 2),
        "send_ms_counted_per_insert": round(statistics.median(plain) * 1000, 2),
        "token_sweep_ms_per_send": round(sweep * 1000 / sends, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_counter_check")
    parser.add_argument("--boards", type=int, default=200)
    parser.add_argument("--items", type=int, default=250)
    parser.add_argument("--big", type=int, default=20_000)
    parser.add_argument("--sends", type=int, default=100)
    args = parser.parse_args(argv)
    with embedded_mongo() as uri, tempfile.TemporaryDirectory() as run_dir:
        components = components_on(uri, run_dir)
        store, board = components.store, components.board
        owners = [f"stf_b{n:04d}" for n in range(args.boards)]
        seeding = time.perf_counter()
        for owner in owners:
            seed_board(store, owner, args.items)
        seed_board(store, "stf_big", args.big)
        seed_s = time.perf_counter() - seeding
        for owner in owners[:CORRUPTED]:
            store.counters.update_one({"_id": domain.owner_key(AGENCY, owner)}, {"$inc": {"u_messages": -1}})

        per_board = [timed(lambda o=o: board.observe(AGENCY, o)) for o in owners[:50]]
        big = timed(lambda: board.observe(AGENCY, "stf_big"))

        check = CounterCheck(components, clock=lambda: 10**9 + time.monotonic())
        check.confirm_s = 0.0
        passes = []
        repaired = 0
        for _ in range(2 * (args.boards + 1) // check.boards_per_pass + 2):
            report = check.check_pass()
            passes.append(report)
            repaired += report.repaired
        exact = all(board.stored_counts(AGENCY, o) == board.recount(AGENCY, o) for o in owners[:CORRUPTED])

        sends = [send_cost(components, n, args.sends) for n in (1, 50)]

    pass_s = [p.seconds for p in passes]
    report = {
        "machine": machine(),
        "boards": args.boards,
        "items_per_board": args.items,
        "big_board_items": args.big,
        "seed_s": round(seed_s, 1),
        "observe_ms_per_board_median": round(statistics.median(per_board) * 1000, 2),
        "observe_us_per_item": round(statistics.median(per_board) * 1e6 / args.items, 1),
        "observe_big_board_s": round(big, 3),
        "pass_s_median": round(statistics.median(pass_s), 3),
        "pass_s_max": round(max(pass_s), 3),
        "pass_boards": [p.boards for p in passes],
        "pass_items_read": [p.items_read for p in passes],
        "corrupted": CORRUPTED,
        "repaired": repaired,
        "exact_after": exact,
        "sends": sends,
    }
    path = write_report("counter_check", report)
    for key, value in report.items():
        print(f"{key}: {value}")
    print(f"report: {path}")
    return 0 if exact and repaired == CORRUPTED else 1


if __name__ == "__main__":
    sys.exit(main())
