"""The oldest-first shapes of board listings (services/inbox/bulk.py docstring) against the real
database server: equality on a board key, `sort_key` $gt a cursor, sorted ascending, served by the
same descending indexes as newest first; and a label's entries the same way."""

from __future__ import annotations

import pytest

from services.inbox.store import INDEXES as INBOX_INDEXES
from services.kit.mongo import ensure_indexes

BOARD = "agy|stf_1|messages"


@pytest.fixture
def db(mongo_client, db_name):
    database = mongo_client[db_name]
    ensure_indexes(database, INBOX_INDEXES)
    return database


def key(n: int) -> str:
    return f"{1_700_000_000_000 + n:013d}.itm_{n:06d}"


def oldest_first(collection, field: str, value: str, limit: int) -> list[str]:
    """Every key of a listing oldest first, page by page with a $gt cursor."""
    out: list[str] = []
    after = None
    while True:
        query: dict = {field: {"$eq": value}}
        if after is not None:
            query["sort_key"] = {"$gt": after}
        page = list(collection.find(query).sort("sort_key", 1).limit(limit))
        out += [doc["sort_key"] for doc in page]
        if len(page) < limit:
            return out
        after = page[-1]["sort_key"]


def test_board_keys_page_oldest_first_with_a_gt_cursor(db):
    docs = []
    for n in range(40):
        urgent = n % 3 == 0
        unread = n % 2 == 0
        docs.append(
            {
                "_id": f"itm_{n:06d}",
                "board": BOARD if n % 5 else "agy|stf_2|messages",
                "unread_board": (BOARD if n % 5 else "agy|stf_2|messages") if unread else None,
                "urgent_board": (BOARD if n % 5 else "agy|stf_2|messages") if urgent else None,
                "sort_key": key(n),
            }
        )
    db.board_items.insert_many(docs)
    mine = [d for d in docs if d["board"] == BOARD]
    assert oldest_first(db.board_items, "board", BOARD, 7) == [d["sort_key"] for d in mine]
    assert oldest_first(db.board_items, "unread_board", BOARD, 4) == [d["sort_key"] for d in mine if d["unread_board"]]
    assert oldest_first(db.board_items, "urgent_board", BOARD, 3) == [d["sort_key"] for d in mine if d["urgent_board"]]


def test_label_entries_page_oldest_first(db):
    label_board = "agy|stf_1|label:lbl_1"
    db.label_items.insert_many(
        [
            {"_id": f"lbl_1|itm_{n:06d}", "label_board": label_board, "item_id": f"itm_{n:06d}", "sort_key": key(n)}
            for n in range(12)
        ]
        + [{"_id": "lbl_2|itm_000001", "label_board": "agy|stf_1|label:lbl_2", "item_id": "x", "sort_key": key(1)}]
    )
    assert oldest_first(db.label_items, "label_board", label_board, 5) == [key(n) for n in range(12)]
