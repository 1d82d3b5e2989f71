"""MongoDB access: one client per process, one database per service.

Query rules that keep the code fast on the embedded nx-27017 server and correct
on real MongoDB (see docs/storage.md): equality as explicit `$eq`, pagination by
an indexed sort key, maintained counters instead of count_documents, epoch
milliseconds instead of datetimes and booleans.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import pymongo
from pymongo.database import Database

_clients: dict[str, pymongo.MongoClient] = {}
_lock = threading.Lock()


def client(uri: str) -> pymongo.MongoClient:
    """The process-wide client for this URI (pymongo clients are thread-safe pools)."""
    with _lock:
        existing = _clients.get(uri)
        if existing is None:
            existing = pymongo.MongoClient(
                uri, serverSelectionTimeoutMS=5000, connectTimeoutMS=5000, retryWrites=True, appname="clinic"
            )
            _clients[uri] = existing
        return existing


def database(uri: str, name: str) -> Database:
    return client(uri)[name]


@dataclass(frozen=True)
class IndexSpec:
    collection: str
    keys: list[tuple[str, int]]
    unique: bool = False
    name: str | None = None


def ensure_indexes(db: Database, specs: Iterable[IndexSpec]) -> None:
    for spec in specs:
        options = {"unique": spec.unique}
        if spec.name:
            options["name"] = spec.name
        db[spec.collection].create_index(spec.keys, **options)


def wait_until_ready(db: Database, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            db.command("ping")
            return
        except pymongo.errors.PyMongoError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def now_ms() -> int:
    return int(time.time() * 1000)


def eq(value: object) -> dict:
    """An explicit equality filter on a scalar (served from an index on nx-27017)."""
    return {"$eq": value}
