"""Search across one staff member's whole Message Board, without opening the board per query.

Subjects, bodies, titles and patients' names are sealed at rest, so nothing can be searched in
clear. Instead every item is indexed by *blind tokens*: each word of its text, normalised
(`words`: accents and punctuation stripped, case folded, one-letter words and a short stop list
dropped), is replaced by a truncated HMAC-SHA256 under the agency's search key
(`KeyRing.search_key`: random, wrapped by the master key, unchanged by data-key rotation). The
sender and the patient a message is about are indexed by pseudo-terms, blinded the same way:
`from:<staff id>`, `p:<word of the patient's name>` and `pid:<patient id>`, which no word of a text
can produce (words hold letters and digits only), so "patient Smith" never matches "Smith" in a body.
No plain word is ever stored or logged; the query text is never logged nor audited.

Postings (collection `search_postings`) are per owner, token and time bucket: one document
`_id` = `<agency>|<owner>|<token>|<bucket>` with `pk` = `<agency>|<owner>|<token>`, `bk` = the
bucket (the item's sort-key time // BUCKET_MS, about 28 hours) and one flat field per item,
`i_<item id>` = that time in ms (the item's sort key is `<13-digit ms>.<item id>`). Writing is an
upsert with `$set` of flat fields, so a repeat writes nothing new. Reading is newest first by the
index (pk, bk). A board of 100,000 items over two years holds about 700,000 such documents
rather than 2.2 million one-posting documents (nx-27017 inserts 2,000 to 5,000 documents a
second), and a query reads a handful of them.

Query (`Search.search`): the terms of `q`, the sender and the patient are ANDed. Each term's newest
documents are probed (PROBE_DOCS, index-served); the rarest term drives: its documents are read
newest first in chunks, the other terms' documents of the same buckets fetched by `_id $in`
(primary key) and intersected in memory; the candidates are then read as board items (`_id $in`)
and the live filters applied to the items as they are now: the caller's own, on the board (not
deleted, recalled or hidden), content not deleted under retention, kind, urgent, unread, label and
date range. So a stale posting (an item deleted, recalled or whose content was deleted) never shows
anything; the request that meets one removes it from the document it read (`SearchIndex.forget`), and
`python -m services.inbox.search prune` removes the rest (`SearchIndex.prune`). Each request examines at most
MAX_EXAMINED items and MAX_DOCS driver documents; when that stops it, the answer says `capped` and
its cursor continues where it stopped.

Indexing is off the request path: `InboxStore.insert_board_items` (every producer's insert: sends,
replies, portal messages, deliveries, reminders, signature requests, coverage copies) tells
`SearchIndex.enqueue` of the items, which records one small job (`search_jobs`, deterministic id,
`due_at` indexed); the background worker (`search-indexer`, every INDEX_INTERVAL_S) claims due jobs
(a guarded `find_one_and_update`, so two replicas share the work), reads the items, opens each
message's or notice's text once (one `_id $in` read of the messages), and writes the postings; a job
is deleted once its postings are written, so a crash only repeats work that is repeatable.
Items that existed before search are indexed by `python -m services.inbox.search reindex`.

Announcements are stored once per agency, not on boards: their words and author are posted under the
agency's ANNOUNCEMENTS_OWNER when an admin posts or edits one (`SearchIndex.index_announcement`,
through the store's `on_announcement` hook), and the first page of a search lists, beside the board's
items, the agency's active announcements holding every term (one read of the posting documents of
the buckets they were posted in, then the announcements themselves as the folder lists them).

Not indexed: later revisions' new words of
a delivered item are added when the revision's fan-out runs, old ones stay (the item is shown as
it is now); a reminder is found at the time it was created. Words match whole (no prefixes).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import logging
import re
import sys
import threading
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from flask import Blueprint, current_app, g, request
from pymongo import DESCENDING, UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from services.inbox import audit, domain
from services.inbox.announcements import Announcements
from services.inbox.components import Feature
from services.kit.auth import Identity
from services.kit.crypto import DecryptionError, PhiCipher
from services.kit.errors import DomainError, InvalidInput
from services.kit.http import require_staff
from services.kit.mongo import IndexSpec, ensure_indexes, now_ms
from services.kit.runtime import every
from services.kit.validation import EARLIEST_YEAR, ID_PATTERN, LATEST_YEAR, Str, instant_ms, query_bool, query_int

log = logging.getLogger(__name__)

POSTINGS = "search_postings"
JOBS = "search_jobs"
INDEXES = [
    IndexSpec(POSTINGS, [("pk", 1), ("bk", -1)], name="pk_bucket"),
    IndexSpec(JOBS, [("due_at", 1)], name="due_at"),
]

BUCKET_MS = 100_000_000  # about 28 hours of an owner's items per posting document
ENTRY = "i_"  # a posting document's field per item: i_<item id> = the item's sort-key time (ms)
TOKEN_BYTES = 12  # 96 bits of HMAC-SHA256: 16 URL-safe characters
MAX_WORD_CHARS = 40
MAX_QUERY_CHARS = 200
MAX_PATIENT_CHARS = 100
MAX_TERMS = 8
PROBE_DOCS = 8  # each term's newest documents, read to choose the rarest term
CHUNK_DOCS = 8  # driver documents verified together
MAX_DOCS = 400  # driver documents one request reads at most
MAX_EXAMINED = 1000  # candidate items one request reads at most
ITEM_BATCH = 100
MAX_LIMIT = 50
JOB_ITEMS = 500  # item ids per indexing job
JOB_BATCH = 50  # jobs per indexing pass
JOB_LEASE_MS = 60_000  # a claimed job left unfinished (a crashed worker) is taken again this much later
INDEX_INTERVAL_S = 0.5
WRITE_BATCH = 1000
# Announcements are stored once per agency, not on boards: their postings belong to this owner,
# which no staff id can be (ids hold no "~"). A query reads only the documents of the buckets the
# agency's active announcements were posted in (services/inbox/announcements.py: at most 200).
ANNOUNCEMENTS_OWNER = "~announcements"
PRUNE_AFTER_MS = 7 * 86_400_000  # a posting document emptied by `prune` is deleted once this old
PRUNE_BATCH = 200  # posting documents settled together by `prune`
ANNOUNCEMENT_KIND = "announcement"

# Words too common to say anything (English; the page's own words "re", "fwd" included).
STOP_WORDS = frozenset(
    """
    an and are as at be but by for from fw fwd had has have he her his if in into is it its me my no
    not of on or our re she so than that the their them then there these they this to us was we were
    will with you your
    """.split()
)

_WORD = re.compile(r"[^\W_]+")  # runs of letters and digits, any script


# --- words and tokens (pure) ----------------------------------------------------------------------


def fold(text: str) -> str:
    """Accents stripped (NFKD without combining marks) and case folded."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


def words(text: str) -> list[str]:
    """The searchable words of a text, each once, in order: letters and digits only, at least two
    characters, not a stop word, at most MAX_WORD_CHARS."""
    found = (w for w in _WORD.findall(fold(text or "")) if 1 < len(w) <= MAX_WORD_CHARS and w not in STOP_WORDS)
    return list(dict.fromkeys(found))


def sender_term(staff_id: str) -> str:
    return f"from:{staff_id}"


def patient_terms(name: str) -> list[str]:
    """The pseudo-terms of a patient's name: its words, apart from every text's words."""
    return [f"p:{word}" for word in words(name)]


def patient_id_term(patient_id: str) -> str:
    return f"pid:{patient_id.casefold()}"


def token(key: bytes, term: str) -> str:
    """The blind token of a term under an agency's search key."""
    digest = hmac.new(key, term.encode("utf-8"), hashlib.sha256).digest()[:TOKEN_BYTES]
    return base64.urlsafe_b64encode(digest).decode("ascii")


def posting_key(agency_id: str, owner_id: str, tok: str) -> str:
    return f"{agency_id}|{owner_id}|{tok}"


def bucket(ms: int) -> int:
    return ms // BUCKET_MS


def doc_id(pk: str, bk: int) -> str:
    return f"{pk}|{bk}"


def split_sort_key(sort_key: str) -> tuple[int, str]:
    head, _, item_id = sort_key.partition(".")
    return int(head), item_id


def entries(doc: dict) -> dict[str, int]:
    """A posting document's items: item id -> sort-key time."""
    return {name[len(ENTRY) :]: int(value) for name, value in doc.items() if name.startswith(ENTRY)}


def encode_cursor(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """A search cursor: `<13-digit ms>.<item id>` or `<13-digit ms>.` (everything before that time)."""
    try:
        key = base64.urlsafe_b64decode((cursor + "=" * (-len(cursor) % 4)).encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput("invalid_cursor", "the cursor is not valid") from exc
    head, dot, item_id = key.partition(".")
    if (
        len(head) != 13
        or not (head.isascii() and head.isdigit())
        or not dot
        or (item_id and not ID_PATTERN.fullmatch(item_id))
    ):
        raise InvalidInput("invalid_cursor", "the cursor is not valid")
    return key


@dataclass(frozen=True)
class Terms:
    """What one item is found by: words of its text, its sender, the patient it is about."""

    words: tuple[str, ...] = ()
    sender_id: str = ""
    patient_id: str = ""
    patient_name: str = ""

    def all(self) -> list[str]:
        terms = list(self.words)
        if self.sender_id:
            terms.append(sender_term(self.sender_id))
        if self.patient_id:
            terms.append(patient_id_term(self.patient_id))
        terms += patient_terms(self.patient_name)
        return list(dict.fromkeys(terms))


# --- the index --------------------------------------------------------------------------------------


class SearchIndex:
    """Postings of board items: written from jobs (or directly by `index_items`), read by Search."""

    def __init__(self, store, cipher: PhiCipher):
        self.store = store
        self.cipher = cipher
        self.postings = store.db[POSTINGS]
        self.jobs = store.db[JOBS]

    def ensure_indexes(self) -> None:
        ensure_indexes(self.store.db, INDEXES)

    def tokens(self, agency_id: str, terms: Iterable[str]) -> list[str]:
        key = self.cipher.keyring.search_key(agency_id)
        return [token(key, term) for term in terms]

    # --- jobs -------------------------------------------------------------------------------------
    def enqueue(self, items: list[dict]) -> None:
        """Record that these items are to be indexed (InboxStore.on_items): one job per
        JOB_ITEMS ids, its id a digest of them, so a repeated insert records nothing new."""
        ids = sorted({item["_id"] for item in items})
        now = now_ms()
        jobs = [
            {"_id": "sj_" + domain.digest(*chunk)[:32], "due_at": now, "item_ids": chunk}
            for chunk in (ids[i : i + JOB_ITEMS] for i in range(0, len(ids), JOB_ITEMS))
        ]
        try:
            self.jobs.insert_many(jobs, ordered=False)
        except BulkWriteError as exc:
            if any(err.get("code") != 11000 for err in exc.details.get("writeErrors", [])):
                raise

    def run_pending(self, limit: int = JOB_BATCH) -> int:
        """One pass: claim the due jobs, index their items, drop the jobs; how many were done."""
        now = now_ms()
        due = list(self.jobs.find({"due_at": {"$lte": now}}).sort("due_at", 1).limit(limit))
        claimed = []
        for job in due:
            taken = self.jobs.find_one_and_update(
                {"_id": {"$eq": job["_id"]}, "due_at": {"$eq": job["due_at"]}},
                {"$set": {"due_at": now + JOB_LEASE_MS}},
            )
            if taken is not None:
                claimed.append(taken)
        if not claimed:
            return 0
        item_ids = list(dict.fromkeys(i for job in claimed for i in job["item_ids"]))
        for start in range(0, len(item_ids), JOB_ITEMS):
            found = self.store.items(item_ids[start : start + JOB_ITEMS])
            self.index_items(list(found.values()))
        for job in claimed:
            self.jobs.delete_one({"_id": {"$eq": job["_id"]}, "due_at": {"$eq": now + JOB_LEASE_MS}})
        return len(claimed)

    def pending(self) -> int:
        """Jobs waiting (a small collection; for tests and the reindex command)."""
        return len(list(self.jobs.find({"due_at": {"$gte": 0}}, projection={"_id": 1}).limit(100_000)))

    def run_worker(self, stop: threading.Event, interval_s: float = INDEX_INTERVAL_S) -> None:
        def drain() -> None:
            while self.run_pending() == JOB_BATCH and not stop.is_set():
                pass

        every(stop, interval_s, drain, "search indexing", errors=(PyMongoError, DomainError))

    # --- postings ----------------------------------------------------------------------------------
    def index_items(self, items: list[dict]) -> int:
        """Write the postings of these items (as stored); how many posting documents were written."""
        groups = self.postings_of(items)
        self.write(groups)
        return len(groups)

    def postings_of(self, items: list[dict]) -> dict[tuple[str, int], dict[str, int]]:
        """(pk, bucket) -> {i_<item id>: ms}: what the items add to which posting documents."""
        texts = self.texts(items)
        groups: dict[tuple[str, int], dict[str, int]] = {}
        keys: dict[str, bytes] = {}
        for item in items:
            sort_key = item.get("sort_key")
            if not sort_key or item.get("content_deleted_at"):
                continue
            ms, item_id = split_sort_key(sort_key)
            agency = item["agency_id"]
            key = keys.get(agency)
            if key is None:
                key = keys[agency] = self.cipher.keyring.search_key(agency)
            terms = texts.get(self.ref_of(item), Terms())
            sender = item.get("sender_id") or ""
            terms = Terms(terms.words, sender, terms.patient_id, terms.patient_name)
            bk = bucket(ms)
            for term in terms.all():
                pk = posting_key(agency, item["owner_id"], token(key, term))
                groups.setdefault((pk, bk), {})[ENTRY + item_id] = ms
        return groups

    def write(self, groups: dict[tuple[str, int], dict[str, int]]) -> None:
        """One upsert per posting document ($set of flat fields: a repeat changes nothing). A
        document created by two writers at once: the loser's write is made again (it exists now)."""
        ops = [
            UpdateOne({"_id": {"$eq": doc_id(pk, bk)}}, {"$set": {"pk": pk, "bk": bk, **fields}}, upsert=True)
            for (pk, bk), fields in groups.items()
        ]
        for start in range(0, len(ops), WRITE_BATCH):
            batch = ops[start : start + WRITE_BATCH]
            try:
                self.postings.bulk_write(batch, ordered=False)
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors", [])
                if any(err.get("code") != 11000 for err in errors):
                    raise
                retry = [batch[err["index"]] for err in errors]
                self.postings.bulk_write(retry, ordered=False)

    @staticmethod
    def ref_of(item: dict) -> str:
        return item.get("message_id") or item.get("ref_id") or item["_id"]

    def texts(self, items: list[dict]) -> dict[str, Terms]:
        """Each referenced record's words and patient, opened once per record: a message's subject
        and body (and patient) from the message, anything else's title and summary from its item."""
        message_ids = list({item["message_id"] for item in items if item.get("message_id")})
        messages: dict[str, dict] = {}
        projection = {"_outbox": 0, "links": 0, "read_by": 0}
        for start in range(0, len(message_ids), JOB_ITEMS):
            chunk = message_ids[start : start + JOB_ITEMS]
            messages.update({m["_id"]: m for m in self.store.messages.find({"_id": {"$in": chunk}}, projection)})
        out: dict[str, Terms] = {}
        for item in items:
            ref = self.ref_of(item)
            if ref in out:
                continue
            message = messages.get(item.get("message_id") or "")
            if message is not None:
                out[ref] = self._message_terms(message)
            else:
                out[ref] = self._item_terms(item)
        return out

    def _open(self, agency: str, record: str, field_name: str, sealed) -> str:
        if sealed is None:
            return ""
        if isinstance(sealed, dict):  # a retention stub's subject (never indexed)
            return ""
        try:
            return self.cipher.open(agency, record, field_name, sealed)
        except DecryptionError:
            log.warning("search: a field could not be opened", extra={"agency_id": agency, "record_id": record})
            return ""

    def _message_terms(self, message: dict) -> Terms:
        if message.get("content_deleted_at"):
            return Terms()
        agency, mid = message["agency_id"], message["_id"]
        text = " ".join(
            [
                self._open(agency, mid, "subject", message.get("subject")),
                self._open(agency, mid, "body", message.get("body")),
            ]
        )
        name = self._open(agency, mid, "patient_name", message.get("patient_name"))
        return Terms(tuple(words(text)), "", message.get("patient_id") or "", name)

    def _item_terms(self, item: dict) -> Terms:
        agency, ref = item["agency_id"], item.get("ref_id") or item["_id"]
        parts = [
            self._open(agency, item.get("message_id") or ref, "subject", item.get("subject")),
            self._open(agency, ref, "title", item.get("title")),
            self._open(agency, ref, "summary", item.get("summary")),
        ]
        # A delivered item's patient (DeliverItemRequest.patient_name, e.g. a lab result's PID-5).
        name = self._open(agency, ref, "patient_name", item.get("patient_name"))
        return Terms(tuple(words(" ".join(parts))), "", "", name)

    def index_announcement(self, doc: dict, title: str, body: str) -> None:
        """An announcement's words and author, under the agency's announcements owner, bucketed by
        the time it was posted. Repeating it (an edit) adds new words and changes nothing else."""
        agency = doc["agency_id"]
        key = self.cipher.keyring.search_key(agency)
        terms = [*words(f"{title} {body}"), sender_term(doc.get("posted_by") or "")]
        ms, bk = int(doc["posted_at"]), bucket(int(doc["posted_at"]))
        groups = {
            (posting_key(agency, ANNOUNCEMENTS_OWNER, token(key, term)), bk): {ENTRY + doc["_id"]: ms}
            for term in dict.fromkeys(terms)
        }
        self.write(groups)

    def announcements_holding(self, agency_id: str, terms: list[str], candidates: dict[str, int]) -> list[str]:
        """Which of the `candidates` (announcement id -> time posted) hold every term, newest first:
        one `_id $in` read of the posting documents of their buckets per term."""
        buckets = sorted({bucket(ms) for ms in candidates.values()})
        left = dict(candidates)
        for tok in self.tokens(agency_id, terms):
            pk = posting_key(agency_id, ANNOUNCEMENTS_OWNER, tok)
            held: set[str] = set()
            for doc in self.by_ids([doc_id(pk, bk) for bk in buckets]).values():
                held.update(key[len(ENTRY) :] for key in doc if key.startswith(ENTRY))
            left = {aid: ms for aid, ms in left.items() if aid in held}
            if not left:
                return []
        return sorted(left, key=lambda aid: (left[aid], aid), reverse=True)

    # --- pruning -------------------------------------------------------------------------------------
    def forget(self, pk: str, dead: dict[str, int]) -> int:
        """Remove the postings of items gone for good (deleted, recalled, content deleted) from the
        term's documents: one `$unset` per bucket, guarded by each entry's time, so an item put back
        (a notice delivered again, indexed anew at another time) keeps its posting. How many went."""
        by_bucket: dict[int, dict[str, int]] = {}
        for item_id, ms in dead.items():
            by_bucket.setdefault(bucket(ms), {})[ENTRY + item_id] = ms
        removed = 0
        for bk, fields in by_bucket.items():
            guard = {"_id": {"$eq": doc_id(pk, bk)}, **{name: {"$eq": ms} for name, ms in fields.items()}}
            try:
                done = self.postings.update_one(guard, {"$unset": {name: "" for name in fields}})
            except PyMongoError:
                log.warning("search: stale postings not removed")
                return removed
            removed += len(fields) if done.modified_count else 0
        return removed

    def prune(self, agency_id: str | None, progress: Callable[[str], None], now: int | None = None) -> dict:
        """Every board's postings (of one agency, or all) without the items gone for good; a document
        left with none is deleted once its bucket is older than PRUNE_AFTER_MS (a newer one may be
        written again at any moment, an old one only by `reindex`), guarded by what it held."""
        horizon = bucket((now or now_ms()) - PRUNE_AFTER_MS)
        boards = removed = deleted = 0
        after = f"{agency_id}|" if agency_id else ""
        while True:
            owners = self.store.counter_owners(after, 200)
            if not owners or (agency_id and not owners[0].startswith(f"{agency_id}|")):
                break
            for owner in owners:
                after = owner
                if agency_id and not owner.startswith(f"{agency_id}|"):
                    break
                gone, dropped = self._prune_board(owner, horizon)
                boards, removed, deleted = boards + 1, removed + gone, deleted + dropped
                progress(f"{owner}: {gone} postings removed, {dropped} documents deleted ({boards} boards)")
        return {"boards": boards, "postings_removed": removed, "documents_deleted": deleted}

    def _prune_board(self, owner: str, horizon: int) -> tuple[int, int]:
        prefix = f"{owner}|"
        query = {"pk": {"$gte": prefix, "$lt": prefix + "\uffff"}}
        removed = deleted = 0
        batch: list[dict] = []

        def settle(docs: list[dict]) -> None:
            nonlocal removed, deleted
            ids = sorted({key[len(ENTRY) :] for doc in docs for key in doc if key.startswith(ENTRY)})
            live: set[str] = set()
            for start in range(0, len(ids), ITEM_BATCH * 5):
                found = self.store.board_items.find(
                    {"_id": {"$in": ids[start : start + ITEM_BATCH * 5]}}, projection={"content_deleted_at": 1}
                )
                live |= {item["_id"] for item in found if not item.get("content_deleted_at")}
            for doc in docs:
                held = entries(doc)
                dead = {i: ms for i, ms in held.items() if i not in live}
                if not dead:
                    continue
                if len(dead) == len(held) and doc["bk"] < horizon:
                    guard = {"_id": {"$eq": doc["_id"]}, **{ENTRY + i: {"$eq": ms} for i, ms in held.items()}}
                    if self.postings.delete_one(guard).deleted_count:
                        removed, deleted = removed + len(dead), deleted + 1
                        continue
                removed += self.forget(doc["pk"], dead)

        for doc in self.postings.find(query):
            batch.append(doc)
            if len(batch) == PRUNE_BATCH:
                settle(batch)
                batch = []
        if batch:
            settle(batch)
        return removed, deleted

    # --- reading -------------------------------------------------------------------------------------
    def newest(self, pk: str, upper_bk: int | None, n: int) -> list[dict]:
        query: dict = {"pk": {"$eq": pk}}
        if upper_bk is not None:
            query["bk"] = {"$lte": upper_bk}
        return list(self.postings.find(query).sort("bk", DESCENDING).limit(n))

    def older(self, pk: str, below_bk: int, n: int) -> list[dict]:
        query = {"pk": {"$eq": pk}, "bk": {"$lt": below_bk}}
        return list(self.postings.find(query).sort("bk", DESCENDING).limit(n))

    def by_ids(self, ids: list[str]) -> dict[str, dict]:
        if not ids:
            return {}
        return {doc["_id"]: doc for doc in self.postings.find({"_id": {"$in": ids}})}

    # --- maintenance -------------------------------------------------------------------------------
    def reindex(self, agency_id: str | None, progress: Callable[[str], None], batch: int = 1000) -> dict:
        """Index every item on every board (of one agency, or all): for items from before search.
        Boards are found through their counter documents; hidden items (reminders not yet due) are
        indexed when they are inserted, not here."""
        boards = items = 0
        after = f"{agency_id}|" if agency_id else ""
        while True:
            owners = self.store.counter_owners(after, 200)
            if not owners:
                break
            for owner in owners:
                after = owner
                agency, _, staff_id = owner.partition("|")
                if agency_id and agency != agency_id:
                    return {"boards": boards, "items": items}
                count = 0
                page: list[dict] = []
                for item in self.store.owner_items(agency, staff_id, domain.ITEM_FOLDERS, batch=batch):
                    page.append(item)
                    if len(page) == batch:
                        self.index_items(page)
                        count += len(page)
                        page = []
                if page:
                    self.index_items(page)
                    count += len(page)
                boards += 1
                items += count
                progress(f"{agency}|{staff_id}: {count} items indexed ({boards} boards, {items} items so far)")
        return {"boards": boards, "items": items}

    def reindex_announcements(self, agency_id: str | None, progress: Callable[[str], None]) -> int:
        """Index every announcement (of one agency, or all), expired ones included."""
        query = {"agency_key": {"$eq": agency_id}} if agency_id else {}
        count = 0
        for doc in self.store.db["announcements"].find(query, projection={"_outbox": 0}):
            agency, aid = doc["agency_id"], doc["_id"]
            title = self._open(agency, aid, "title", doc.get("title"))
            body = self._open(agency, aid, "body", doc.get("body"))
            self.index_announcement(doc, title, body)
            count += 1
        progress(f"{count} announcements indexed")
        return count


# --- the query ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    words: tuple[str, ...] = ()
    sender_id: str | None = None
    patient: str | None = None
    since_ms: int | None = None  # sent at or after
    until_ms: int | None = None  # sent before
    kind: str | None = None
    urgent: bool = False
    unread: bool = False
    label_id: str | None = None


@dataclass
class Scan:
    """One request's progress through the driver term's postings."""

    found: list[tuple[str, dict]] = field(default_factory=list)  # (posting sort key, item)
    examined: int = 0
    docs: int = 0
    position: str | None = None  # everything at or after this sort key is done
    capped: bool = False
    full: bool = False
    dead: dict[str, int] = field(default_factory=dict)  # candidates of items gone for good: id -> ms


class Search(Feature):
    """`GET /api/v1/board/search`, the index hook on every insert of board items, the indexer."""

    def __init__(self, components):
        super().__init__(components)
        self.index = SearchIndex(components.store, components.cipher)

    def ensure_indexes(self) -> None:
        self.index.ensure_indexes()

    def attach(self) -> None:
        self.components.store.on_items = self.index.enqueue
        self.components.store.on_announcement = self.index.index_announcement

    def background(self):
        return [("search-indexer", self.index.run_worker)]

    def blueprint(self) -> Blueprint:
        return routes

    # --- search -----------------------------------------------------------------------------------
    def search(self, caller: Identity, query: Query, cursor: str | None, limit: int) -> dict:
        board = self.components.board
        label_id = board._own_label(caller, query.label_id)["_id"] if query.label_id else None  # noqa: SLF001
        terms, patient_id = self._terms(caller, query)
        upper = decode_cursor(cursor) if cursor else None
        if query.until_ms is not None:
            until = f"{query.until_ms:013d}."
            upper = until if upper is None or until < upper else upper
        if query.kind == ANNOUNCEMENT_KIND:
            scan = Scan()
        else:
            scan = self._scan(caller, terms, upper, query, label_id=label_id, limit=limit)
        shown = [board.summary(caller, item) for _, item in scan.found[:limit]]
        if scan.full:
            next_key: str | None = scan.found[limit - 1][0]
        else:
            next_key = scan.position if scan.capped else None
        announcements = [] if cursor else self._announcements(caller, terms, query, label_id, limit)
        count = len(shown) + len(announcements)
        audit.record_list(self.components.store, caller, "board_search", "search", count, patient_id=patient_id)
        return {
            "items": shown,
            "announcements": announcements,
            "next_cursor": encode_cursor(next_key) if next_key else None,
            "capped": scan.capped and not scan.full,
        }

    def _announcements(self, caller: Identity, terms: list[str], query: Query, label_id, limit: int) -> list[dict]:
        """The active announcements of the caller's agency that match, with the first page only:
        they are few and not board items (no patient, urgency or label; dates by when posted)."""
        feature = next((f for f in self.components.features if isinstance(f, Announcements)), None)
        if feature is None or query.patient or query.urgent or label_id:
            return []
        if query.kind not in (None, ANNOUNCEMENT_KIND):
            return []
        since, until = query.since_ms, query.until_ms
        active = {
            aid: ms
            for aid, ms in feature.active(caller.agency_id).items()
            if (since is None or ms >= since) and (until is None or ms < until)
        }
        if not active:
            return []
        ids = self.index.announcements_holding(caller.agency_id, terms, active)
        return feature.found(caller, ids[:limit], unread=query.unread)

    def _terms(self, caller: Identity, query: Query) -> tuple[list[str], str]:
        """The query's terms (ANDed) and the patient id it names, if any. A patient given as an id
        that some item of the board is about is matched by id; otherwise by the words of a name."""
        terms = list(query.words)
        if query.sender_id:
            terms.append(sender_term(query.sender_id))
        patient_id = ""
        if query.patient:
            text = query.patient.strip()
            by_id = patient_id_term(text) if ID_PATTERN.fullmatch(text) else None
            if by_id is not None and self._has_postings(caller, by_id):
                terms.append(by_id)
                patient_id = text
            else:
                name_terms = patient_terms(text)
                if not name_terms:
                    raise InvalidInput("invalid_query", "patient names no searchable word", {"field": "patient"})
                terms += name_terms
        if not terms:
            raise InvalidInput(
                "missing_search_terms", "give words to look for (q), a sender (sender_id) or a patient (patient)"
            )
        if len(terms) > MAX_TERMS:
            raise InvalidInput(
                "too_many_terms", f"a search holds at most {MAX_TERMS} words, sender and patient together"
            )
        return terms, patient_id

    def _has_postings(self, caller: Identity, term: str) -> bool:
        (tok,) = self.index.tokens(caller.agency_id, [term])
        return bool(self.index.newest(posting_key(caller.agency_id, caller.staff_id, tok), None, 1))

    def _scan(self, caller: Identity, terms: list[str], upper: str | None, query: Query, *, label_id, limit) -> Scan:
        scan = Scan(position=upper)
        pks = [
            posting_key(caller.agency_id, caller.staff_id, tok) for tok in self.index.tokens(caller.agency_id, terms)
        ]
        pks = list(dict.fromkeys(pks))
        # sk < upper: up to upper's time, or before it when upper names no item ("<ms>.").
        upper_bk = bucket(int(upper[:13]) - (0 if upper[14:] else 1)) if upper else None
        lower_bk = bucket(query.since_ms) if query.since_ms is not None else None
        probes = {pk: self.index.newest(pk, upper_bk, PROBE_DOCS) for pk in pks}
        if any(not docs for docs in probes.values()):
            return scan  # a term with no posting: nothing matches them all
        driver = min(pks, key=lambda pk: _rarity(probes[pk]))
        others = [pk for pk in pks if pk != driver]
        accept = _accepts(caller, query, label_id)
        for read in _chunks(self._driver_docs(driver, probes[driver]), CHUNK_DOCS):
            chunk = [doc for doc in read if lower_bk is None or doc["bk"] >= lower_bk]
            if not chunk:
                break
            last = len(chunk) < len(read) or (lower_bk is not None and chunk[-1]["bk"] <= lower_bk)
            scan.docs += len(chunk)
            held = self.index.by_ids([doc_id(pk, doc["bk"]) for pk in others for doc in chunk])
            candidates = []
            for doc in chunk:
                verify = [entries(held.get(doc_id(pk, doc["bk"]), {})) for pk in others]
                for item_id, ms in entries(doc).items():
                    sk = f"{ms:013d}.{item_id}"
                    if upper is not None and sk >= upper:
                        continue
                    if query.since_ms is not None and ms < query.since_ms:
                        continue
                    if all(item_id in entry for entry in verify):
                        candidates.append(sk)
            candidates.sort(reverse=True)
            stop = self._examine(scan, candidates, accept, limit)
            self.index.forget(driver, scan.dead)  # what this request met of items gone, the next one will not
            scan.dead.clear()
            if stop:
                return scan
            scan.position = f"{chunk[-1]['bk'] * BUCKET_MS:013d}."
            if last:
                break
            if scan.docs >= MAX_DOCS:
                scan.capped = True
                return scan
        return scan

    def _examine(self, scan: Scan, candidates: list[str], accept, limit: int) -> bool:
        """Read candidate items newest first and keep those the live filters accept; True when the
        page is full or the cap is reached (the scan stops)."""
        start = 0
        while start < len(candidates):
            # As many as the page still needs (most candidates pass), more when they do not.
            size = min(ITEM_BATCH, max(limit + 1 - len(scan.found), 10) * (2 if scan.examined else 1))
            batch = candidates[start : start + size]
            start += size
            found = self.components.store.items([split_sort_key(sk)[1] for sk in batch])
            for sk in batch:
                item = found.get(split_sort_key(sk)[1])
                scan.examined += 1
                scan.position = sk
                if item is None or item.get("content_deleted_at"):
                    ms, item_id = split_sort_key(sk)
                    scan.dead[item_id] = ms
                if item is not None and accept(item):
                    scan.found.append((sk, item))
                    if len(scan.found) > limit:
                        scan.full = True
                        return True
                if scan.examined >= MAX_EXAMINED:
                    scan.capped = True
                    return True
        return False

    def _driver_docs(self, pk: str, first: list[dict]) -> Iterator[dict]:
        yield from first
        if len(first) < PROBE_DOCS:
            return
        below = first[-1]["bk"]
        while True:
            page = self.index.older(pk, below, CHUNK_DOCS * 2)
            yield from page
            if len(page) < CHUNK_DOCS * 2:
                return
            below = page[-1]["bk"]


def _rarity(docs: list[dict]) -> tuple[int, float]:
    """How common a term looks from its newest documents: a term with fewer than PROBE_DOCS
    documents is known whole (its count); otherwise its items per bucket over the span read."""
    count = sum(len(entries(doc)) for doc in docs)
    if len(docs) < PROBE_DOCS:
        return 0, float(count)
    return 1, count / (docs[0]["bk"] - docs[-1]["bk"] + 1)


def _chunks(docs: Iterator[dict], n: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _accepts(caller: Identity, query: Query, label_id: str | None) -> Callable[[dict], bool]:
    """The live filters, on an item as it is now."""

    def accept(item: dict) -> bool:
        if item.get("agency_id") != caller.agency_id or item.get("owner_id") != caller.staff_id:
            return False
        if not item.get("board") or item.get("content_deleted_at"):
            return False
        if query.kind and item.get("kind") != query.kind:
            return False
        if query.urgent and not item.get("urgent"):
            return False
        if query.unread and not item.get("unread_board"):
            return False
        if label_id and label_id not in (item.get("labels") or {}):
            return False
        sent_at = int(item.get("sent_at") or 0)
        if query.since_ms is not None and sent_at < query.since_ms:
            return False
        return not (query.until_ms is not None and sent_at >= query.until_ms)

    return accept


# --- HTTP -----------------------------------------------------------------------------------------------

routes = Blueprint("board_search", __name__, url_prefix="/api/v1/board")

PARAMS = ("q", "sender_id", "patient", "from", "to", "kind", "urgent", "unread", "label_id", "cursor", "limit")


def _feature() -> Search:
    components = current_app.extensions["inbox"]
    return next(feature for feature in components.features if isinstance(feature, Search))


def _one(name: str) -> str | None:
    values = request.args.getlist(name)
    return values[0] if values else None


def _id_param(name: str) -> str | None:
    value = _one(name)
    if not value:
        return None
    if not ID_PATTERN.fullmatch(value):
        raise InvalidInput("invalid_query", f"{name} is not an id", {"field": name})
    return value


def _time_param(name: str, end: bool) -> int | None:
    """An ISO-8601 time with offset, or a date (a whole UTC day: its start, or for `to` its end)."""
    value = _one(name)
    if not value:
        return None
    if len(value) == 10:
        try:
            day = dt.datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=dt.UTC)
        except ValueError as exc:
            raise InvalidInput("invalid_time", f"{name} must be a date or an ISO-8601 time", {"field": name}) from exc
        if not EARLIEST_YEAR <= day.year <= LATEST_YEAR:
            raise InvalidInput("invalid_time", f"{name} is out of range", {"field": name})
        return int((day + dt.timedelta(days=1 if end else 0)).timestamp() * 1000)
    return instant_ms(name, Str(max_len=64).clean(name, value))


def query_from_request() -> tuple[Query, str | None, int]:
    """The search's parameters, refused before anything is read: unknown or repeated parameters,
    wrong types, over-long text (400 with the kit's codes)."""
    unknown = sorted(set(request.args) - set(PARAMS))
    if unknown:
        raise InvalidInput("invalid_query", f"unknown query parameter: {unknown[0]}", {"field": unknown[0]})
    repeated = sorted(name for name in request.args if len(request.args.getlist(name)) > 1)
    if repeated:
        raise InvalidInput("invalid_query", f"{repeated[0]} is given more than once", {"field": repeated[0]})
    q = Str(max_len=MAX_QUERY_CHARS, min_len=0).clean("q", _one("q") or "")
    patient = Str(max_len=MAX_PATIENT_CHARS, min_len=0).clean("patient", _one("patient") or "") or None
    found = words(q)
    if q and not found and not (_one("sender_id") or patient):
        raise InvalidInput("missing_search_terms", "q holds no word that can be searched for", {"field": "q"})
    kind = _one("kind") or None
    kinds = (*domain.ITEM_KINDS, ANNOUNCEMENT_KIND)
    if kind is not None and kind not in kinds:
        raise InvalidInput("invalid_query", f"kind must be one of: {', '.join(kinds)}", {"field": "kind"})
    since, until = _time_param("from", end=False), _time_param("to", end=True)
    if since is not None and until is not None and until <= since:
        raise InvalidInput("invalid_query", "to must be after from", {"field": "to"})
    query = Query(
        words=tuple(found),
        sender_id=_id_param("sender_id"),
        patient=patient,
        since_ms=since,
        until_ms=until,
        kind=kind,
        urgent=query_bool("urgent"),
        unread=query_bool("unread"),
        label_id=_id_param("label_id"),
    )
    return query, _one("cursor") or None, query_int("limit", 20, 1, MAX_LIMIT)


@routes.get("/search")
@require_staff
def search_route():
    query, cursor, limit = query_from_request()
    return _feature().search(g.identity, query, cursor, limit)


# --- the reindex command ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """python -m services.inbox.search reindex|prune [--agency A]: index items (and announcements)
    from before search; remove the postings of items gone for good."""
    from services.inbox import config
    from services.inbox.store import InboxStore
    from services.kit import mongo
    from services.kit.bootstrap import phi_cipher
    from services.kit.settings import SettingsError

    parser = argparse.ArgumentParser(prog="python -m services.inbox.search")
    parser.add_argument("command", choices=("reindex", "prune"))
    parser.add_argument("--agency", help="one agency id (default: every board)")
    args = parser.parse_args(argv)
    try:
        settings = config.load()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    db = mongo.database(settings.common.mongo_uri, settings.common.mongo_db)
    index = SearchIndex(InboxStore(db), phi_cipher(db, settings.common))
    index.ensure_indexes()
    if args.command == "prune":
        pruned = index.prune(args.agency, lambda line: print(line, file=sys.stderr, flush=True))
        print(json.dumps(pruned))
        return 0
    try:
        report = index.reindex(args.agency, lambda line: print(line, file=sys.stderr, flush=True))
        announcements = index.reindex_announcements(args.agency, lambda line: print(line, file=sys.stderr, flush=True))
    except DuplicateKeyError as exc:  # pragma: no cover - upserts retry their own clashes
        print(f"reindex failed: {exc.code}", file=sys.stderr)
        return 1
    print(f'{{"boards": {report["boards"]}, "items": {report["items"]}, "announcements": {announcements}}}')
    return 0


if __name__ == "__main__":
    sys.exit(main())
