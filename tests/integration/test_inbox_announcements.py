"""Agency announcements against the real database: stored once, read state per staff member."""

from __future__ import annotations

import pytest

from clinic.inbox.v1 import inbox_pb2
from services.inbox import announcements as ann
from services.inbox import domain, store
from services.kit.auth import current_identity
from services.kit.errors import Conflict, Forbidden, InvalidInput, NotFound
from services.kit.events import decode_envelope, unpack
from services.kit.mongo import now_ms
from tests.integration.inbox_fixtures import staff

AGENCY = "agy_1"
OTHER = "agy_2"
COLLECTIONS = (ann.ANNOUNCEMENTS, ann.STATES, store.BOARD_ITEMS, store.COUNTERS, store.MESSAGES)


@pytest.fixture
def feature(inbox):
    components, table = inbox
    feature = ann.Announcements(components)
    feature.ensure_indexes()
    feature.attach()
    return feature


def admin(agency=AGENCY, staff_id="stf_admin"):
    return staff(agency, staff_id, "staff", "admin", name="Alex Admin")


def as_caller(caller, fn, *args, **kwargs):
    token = current_identity.set(caller)
    try:
        return fn(*args, **kwargs)
    finally:
        current_identity.reset(token)


def unread(components, caller) -> int:
    tree = components.board.tree(caller)
    return next(f for f in tree["folders"] if f["id"] == domain.FOLDER_ANNOUNCEMENTS)["unread"]


def counts(db) -> dict[str, int]:
    return {name: db[name].count_documents({}) for name in COLLECTIONS}


class CountingResolve:
    def __init__(self, resolve):
        self.resolve, self.calls = resolve, 0

    def __call__(self, addressing):
        self.calls += 1
        return self.resolve(addressing)


def test_posting_costs_the_same_for_ten_and_a_thousand_staff(inbox, feature):
    components, table = inbox
    table.staff.update({f"stf_s{n}": AGENCY for n in range(10)})
    table.staff.update({f"stf_b{n}": OTHER for n in range(1000)})
    spy = CountingResolve(table.resolve)
    table.resolve = spy
    db = components.store.db
    deltas = []
    for agency in (AGENCY, OTHER):
        before = counts(db)
        as_caller(admin(agency), feature.post, admin(agency), "Parking lot closed", "Use the north entrance.")
        after = counts(db)
        deltas.append({name: after[name] - before[name] for name in COLLECTIONS})
    assert deltas[0] == deltas[1] == {name: int(name == ann.ANNOUNCEMENTS) for name in COLLECTIONS}
    assert spy.calls == 0


def test_the_posted_event_rides_in_the_announcement(inbox, feature):
    components, _ = inbox
    posted = feature.post(admin(), "Flu shots", "Clinic on Friday", ack_required=True)
    doc = components.store.db[ann.ANNOUNCEMENTS].find_one({"_id": posted["id"]})
    assert doc["_outbox_at"] and b"Flu shots" not in repr(doc).encode()
    (entry,) = doc["_outbox"].values()
    envelope = decode_envelope(bytes(entry["env"]))
    event = unpack(envelope, inbox_pb2.AnnouncementPosted)
    assert entry["rk"] == envelope.event_type == "announcement.posted.v1" and envelope.producer == "inbox"
    assert (event.announcement_id, event.agency_id, event.posted_by_staff_id) == (posted["id"], AGENCY, "stf_admin")
    assert event.acknowledgement_required is True
    assert ann.ANNOUNCEMENTS in feature.outbox_collections


def test_unread_count_is_per_staff_member(inbox, feature):
    components, _ = inbox
    a, b = staff(AGENCY, "stf_a"), staff(AGENCY, "stf_b")
    first = feature.post(admin(), "One", "First")
    second = feature.post(admin(), "Two", "Second")
    assert unread(components, a) == unread(components, b) == 2
    assert unread(components, admin()) == 0  # the author's own
    assert unread(components, staff(OTHER, "stf_x")) == 0
    opened = feature.read(a, first["id"])
    assert opened["body"] == "First" and opened["read"] is True
    assert unread(components, a) == 1 and unread(components, b) == 2

    def states(caller):
        return [(item["id"], item["read"]) for item in feature.page(caller, None, 20)["items"]]

    assert states(a) == [(second["id"], False), (first["id"], True)]
    assert states(b) == [(second["id"], False), (first["id"], False)]


def test_reading_is_audited(inbox, feature):
    components, _ = inbox
    posted = feature.post(admin(), "Audit", "Body")
    feature.read(staff(AGENCY, "stf_a"), posted["id"])
    records = list(components.store.db[store.ACCESS_DENIALS].find({"resource_id": posted["id"]}))
    assert [(r["actor_id"], r["action"]) for r in records] == [("stf_a", "read")]


def strictly_later_clock():
    """The real clock, but never the same millisecond twice: posts made in one millisecond are
    ordered by their random ids, so a test that expects posting order needs distinct times."""
    last = [0]

    def tick() -> int:
        last[0] = max(now_ms(), last[0] + 1)
        return last[0]

    return tick


def test_expiry_removes_it_from_the_count_and_the_listing(inbox, feature, monkeypatch):
    components, _ = inbox
    monkeypatch.setattr(ann, "now_ms", strictly_later_clock())
    a = staff(AGENCY, "stf_a")
    lasting = feature.post(admin(), "Lasting", "Stays")
    timed = feature.post(admin(), "Timed", "Goes", expires_at=now_ms() + 60_000)
    expired = feature.post(admin(), "Expired by hand", "Goes now")
    assert unread(components, a) == 3
    feature.expire(admin(), expired["id"])
    assert unread(components, a) == 2
    # Time runs out: the count drops, and the announcement leaves the active index.
    components.store.db[ann.ANNOUNCEMENTS].update_one({"_id": timed["id"]}, {"$set": {"expires_at": now_ms() - 1}})
    assert unread(components, a) == 1
    assert components.store.db[ann.ANNOUNCEMENTS].find_one({"_id": timed["id"]})["active_key"] is None
    assert [i["id"] for i in feature.page(a, None, 20)["items"]] == [lasting["id"]]
    with pytest.raises(NotFound):
        feature.read(a, timed["id"])
    everything = feature.page(admin(), None, 20, include_expired=True)["items"]
    assert [(i["id"], i["expired"]) for i in everything] == [
        (expired["id"], True),
        (timed["id"], True),
        (lasting["id"], False),
    ]
    with pytest.raises(Forbidden):
        feature.page(a, None, 20, include_expired=True)
    # Extending the expiry brings it back.
    feature.edit(admin(), timed["id"], {"expires_at": now_ms() + 60_000, "title": "Timed again"})
    assert unread(components, a) == 2
    assert feature.read(a, timed["id"])["title"] == "Timed again"


def test_acknowledgements(inbox, feature):
    components, table = inbox
    table.staff.update({s: AGENCY for s in ("stf_admin", "stf_a", "stf_b", "stf_c")})
    table.staff["stf_x"] = OTHER
    posted = feature.post(admin(), "Policy update", "Please acknowledge", ack_required=True)
    a, b = staff(AGENCY, "stf_a"), staff(AGENCY, "stf_b")
    first = feature.acknowledge(a, posted["id"])
    assert first["acknowledged"] is True and first["read"] is True
    assert feature.acknowledge(a, posted["id"])["acknowledged_at"] == first["acknowledged_at"]
    feature.acknowledge(b, posted["id"])
    lists = as_caller(admin(), feature.acknowledgements, admin(), posted["id"])
    assert [entry["staff_id"] for entry in lists["acknowledged"]] == ["stf_a", "stf_b"]
    assert lists["acknowledged"][0]["at"] == first["acknowledged_at"]
    assert lists["pending"] == ["stf_c"]
    assert unread(components, a) == 0 and unread(components, staff(AGENCY, "stf_c")) == 1
    with pytest.raises(Forbidden):
        feature.acknowledgements(a, posted["id"])
    plain = feature.post(admin(), "No ack", "Just news")
    with pytest.raises(Conflict):
        feature.acknowledge(a, plain["id"])


def test_other_agencies_and_non_admins_are_refused(inbox, feature):
    components, _ = inbox
    posted = feature.post(admin(), "Ours", "Riverbend only")
    outsider = admin(OTHER, "stf_other_admin")
    for action in (feature.read, feature.acknowledge, feature.expire, feature.acknowledgements):
        with pytest.raises(NotFound):
            action(outsider, posted["id"])
    with pytest.raises(NotFound):
        feature.edit(outsider, posted["id"], {"title": "Theirs"})
    assert feature.page(outsider, None, 20)["items"] == []
    nurse = staff(AGENCY, "stf_a")
    with pytest.raises(Forbidden):
        feature.post(nurse, "Mine", "Not allowed")
    with pytest.raises(Forbidden):
        feature.edit(nurse, posted["id"], {"title": "Changed"})
    with pytest.raises(Forbidden):
        feature.expire(nurse, posted["id"])
    assert feature.read(nurse, posted["id"])["title"] == "Ours"


def all_pages(feature, caller, size: int) -> list[str]:
    seen, cursor = [], None
    while True:
        page = feature.page(caller, cursor, size)
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            return seen


def test_listing_pages_newest_first(inbox, feature, monkeypatch):
    # Each post a millisecond after the last: five posts in a row often share a millisecond on
    # a fast machine, and then only the tie-break below orders them.
    ticks = iter(range(now_ms(), now_ms() + 1000))
    monkeypatch.setattr(ann, "now_ms", lambda: next(ticks))
    ids = [feature.post(admin(), f"Post {n}", "Body")["id"] for n in range(5)]
    assert all_pages(feature, staff(AGENCY, "stf_a"), 2) == list(reversed(ids))


def test_posts_of_the_same_millisecond_page_in_one_total_order(inbox, feature, monkeypatch):
    """Equally new posts are ordered by id, so pages neither repeat nor skip one across a cursor."""
    frozen = now_ms()
    monkeypatch.setattr(ann, "now_ms", lambda: frozen)
    ids = [feature.post(admin(), f"Post {n}", "Body")["id"] for n in range(5)]
    expected = sorted(ids, reverse=True)
    for size in (1, 2, 3, 5):
        assert all_pages(feature, staff(AGENCY, "stf_a"), size) == expected


def test_an_expiry_beyond_the_supported_years_is_refused(inbox, feature):
    """A far-future expiry (year 10000 once in UTC) would break every listing that shows it."""
    for far in ("9999-12-31T23:59:59-01:00", "2100-01-01T00:00:00Z"):
        with pytest.raises(InvalidInput) as caught:
            ann.parse_expiry(far, now_ms())
        assert (caught.value.code, caught.value.details) == ("invalid_value", {"field": "expires_at"})
    latest = ann.parse_expiry("2099-12-31T23:59:59-14:00", now_ms())
    posted = feature.post(admin(), "Long-lived", "Stays a while", expires_at=latest)
    assert posted["expires_at"] == "2100-01-01T13:59:59.000Z"
