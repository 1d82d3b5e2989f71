"""Recount a board's counters from its items, run where inbox runs (same environment).

    python -m services.inbox.recount --agency agy_riverbend --staff stf_riverbend_kim
    python -m services.inbox.recount --all          # every board that has counters

Counters are moved by every item change right after the item's own write. A fan-out pass (a send,
a delivered notice) counts what it placed exactly once even across a crash (services/inbox/fanout.py),
and inbox's periodic drift check (services/inbox/counter_check.py) finds and repairs what a process
killed between an item's write and its $inc left off; this tool does the same at once, for one board
or all (reading whole boards, so it is maintenance, never a request path). It moves counters that
differ by the difference, guarded so that a count moved meanwhile is never overwritten, and prints
one JSON line per board with the drift it found ({} when none). Run it when no send is being
repaired (a crashed one is finished within seconds of inbox running again).
"""

from __future__ import annotations

import argparse
import json
import sys

from services.inbox import store
from services.inbox.board import Board
from services.kit import mongo
from services.kit.settings import Env, SettingsError, common_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.inbox.recount")
    parser.add_argument("--agency", help="agency id")
    parser.add_argument("--staff", help="staff id")
    parser.add_argument("--all", action="store_true", help="every board with counters")
    args = parser.parse_args(argv)
    if not args.all and not (args.agency and args.staff):
        parser.error("give --agency and --staff, or --all")
    env = Env("inbox")
    common = common_settings(env)
    try:
        env.done()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    inbox_store = store.InboxStore(mongo.database(common.mongo_uri, common.mongo_db))
    board = Board(inbox_store, cipher=None)  # counting needs no decryption
    if args.all:
        owners = [doc["_id"].split("|", 1) for doc in inbox_store.counters.find({}, projection={"_id": 1})]
    else:
        owners = [[args.agency, args.staff]]
    for agency_id, staff_id in owners:
        drift = board.repair_counts(agency_id, staff_id)
        print(json.dumps({"agency_id": agency_id, "staff_id": staff_id, "drift": drift}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
