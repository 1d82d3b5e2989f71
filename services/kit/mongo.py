"""MongoDB access: one client per process, one database per service.

Query rules that keep the code fast on the embedded nx-27017 server and correct
on real MongoDB (see docs/storage.md): equality as explicit `$eq`, pagination by
an indexed sort key, maintained counters instead of count_documents, epoch
milliseconds instead of datetimes and booleans.

Outages are bounded: with no server it can use (the server refuses or resets connections, or
is known to be down) an operation waits `serverSelectionTimeoutMS` (1.5 s; pymongo looks again
every 0.5 s, so it gives up within 2 s) and raises a ConnectionFailure that the edges answer as
503 `database_unavailable` (services.kit.errors.dependency_outage), within 3 s of the request.
An operation in flight when the server dies fails at once (its connection is reset).

Two timeouts are deliberately left long. There is no `socketTimeoutMS`: it would cut off a
legitimately long operation (an export, a recount) on a healthy server. `connectTimeoutMS` stays
5 s because pymongo also uses it as the timeout of its heartbeat (a `hello` every 10 s), and a
heartbeat that times out clears the pool and interrupts every operation in flight: a busy but
healthy server must not be taken for a dead one. A link that silently stops carrying packets is
therefore noticed by the next heartbeat (up to 10 s + 5 s), which interrupts what was in flight.
The client reconnects by itself once the server is back: no restart.
Options written in the URI (`MONGO_URI=...?serverSelectionTimeoutMS=5000`) win over these.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

import pymongo
from pymongo.database import Database

_clients: dict[str, pymongo.MongoClient] = {}
_lock = threading.Lock()

# serverSelectionTimeoutMS: how long a request waits for an unreachable database before it is
# answered 503 (see the module docstring for why connectTimeoutMS is longer).
CLIENT_OPTIONS = {"serverSelectionTimeoutMS": 1500, "connectTimeoutMS": 5000, "retryWrites": True, "appname": "clinic"}


def client_options(uri: str) -> dict[str, object]:
    """CLIENT_OPTIONS less those the URI sets itself (URI option names are case-insensitive)."""
    given = {name.lower() for name, _ in urllib.parse.parse_qsl(urllib.parse.urlsplit(uri).query)}
    return {name: value for name, value in CLIENT_OPTIONS.items() if name.lower() not in given}


def client(uri: str) -> pymongo.MongoClient:
    """The process-wide client for this URI (pymongo clients are thread-safe pools)."""
    with _lock:
        existing = _clients.get(uri)
        if existing is None:
            existing = pymongo.MongoClient(uri, **client_options(uri))
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
