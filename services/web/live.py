"""Live board updates: delivery events from the bus pushed to the recipient's open pages.

Each web replica consumes its own queue (`web.board-events.<instance>`, expiring once the replica
is gone) bound to the delivery events, so every replica hears every delivery and pushes it to the
pages connected to it (their streams are served by services.web.event_server). What reaches the
browser is only "your board changed in folder X": the page then asks the API, which shows what
the API would show.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from clinic.inbox.v1 import inbox_pb2
from services.kit.bus import Consumer, Topology
from services.kit.events import Envelope, MalformedEvent, unpack

MESSAGE_DELIVERED = "message.delivered.v1"
BOARD_ITEM_DELIVERED = "board_item.delivered.v1"
ANNOUNCEMENT_POSTED = "announcement.posted.v1"
ROUTING_KEYS = (MESSAGE_DELIVERED, BOARD_ITEM_DELIVERED, ANNOUNCEMENT_POSTED)
QUEUE_EXPIRES_MS = 10 * 60 * 1000
SUBSCRIBER_BACKLOG = 256  # further changes for a page this far behind are dropped: it refetches anyway


@dataclass(frozen=True)
class BoardChange:
    """What a page is told: its board changed in this folder (no ids, no content)."""

    folder: str


class TooManyStreams(Exception):
    pass


Deliver = Callable[[Callable[[], None]], None]


def _at_once(push: Callable[[], None]) -> None:
    push()


class Subscription:
    """One open page's place in the hub. Changes pushed to it wait in `pending` (at most
    SUBSCRIBER_BACKLOG: a page that far behind refetches anyway) and `listener`, the page's stream,
    is told. Pushes and `end` run where the hub delivers (the event stream server's loop), so the
    stream reads `pending` without a lock."""

    __slots__ = ("hub", "key", "pending", "ended", "listener")

    def __init__(self, hub: Hub, key: tuple[str, str]):
        self.hub = hub
        self.key = key
        self.pending: deque[BoardChange] = deque()
        self.ended = False  # replaced by a newer page of the same person, or the hub closed
        self.listener: Callable[[], None] | None = None

    def push(self, change: BoardChange) -> None:
        if self.ended:
            return
        if len(self.pending) < SUBSCRIBER_BACKLOG:
            self.pending.append(change)
        if self.listener is not None:
            self.listener()

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.listener is not None:
            self.listener()

    def take(self) -> list[BoardChange]:
        """The changes pushed since the last call, oldest first (one at a time: a push from another
        thread meanwhile is kept for the next call, not lost)."""
        changes = []
        while self.pending:
            changes.append(self.pending.popleft())
        return changes

    def close(self) -> None:
        self.hub.unsubscribe(self)


class Hub:
    """Open event streams by agency and staff member. Subscribing and publishing are thread-safe
    (the bus consumer publishes from its own thread); what a publish pushes to the streams runs
    through `deliver`, which the event stream server points at its loop, one call per event
    whatever the number of pages it reaches (default: at once, in the caller's thread)."""

    def __init__(self, max_streams: int, max_streams_per_staff: int, deliver: Deliver | None = None):
        self.max_streams = max_streams
        self.max_streams_per_staff = max_streams_per_staff
        self._deliver: Deliver = deliver or _at_once
        self._lock = threading.Condition()
        # agency -> staff member -> that person's streams, oldest first.
        self._by_agency: dict[str, dict[str, dict[Subscription, None]]] = {}
        self._count = 0
        self.closed = threading.Event()

    def deliver_with(self, deliver: Deliver | None) -> None:
        """Where pushes run from now on (None: at once, in the publisher's thread)."""
        self._deliver = deliver or _at_once

    def subscribe(self, agency_id: str, staff_id: str) -> Subscription:
        """A new stream for this person. A person over their limit loses their oldest stream (a page
        closed without the server noticing yet, most likely); the process over its limit refuses."""
        evicted = None
        if self.closed.is_set():  # stopping: the page tries again, on another replica
            raise TooManyStreams
        with self._lock:
            staff = self._by_agency.setdefault(agency_id, {})
            mine = staff.setdefault(staff_id, {})
            if len(mine) >= self.max_streams_per_staff:
                evicted = next(iter(mine))
                del mine[evicted]
                self._count -= 1
            if self._count >= self.max_streams:
                self._forget_empty(agency_id, staff_id)
                raise TooManyStreams
            subscription = Subscription(self, (agency_id, staff_id))
            mine[subscription] = None
            self._count += 1
        if evicted is not None:
            self._deliver(evicted.end)
        return subscription

    def _forget_empty(self, agency_id: str, staff_id: str) -> None:
        """Drop the person's and the agency's entries once they hold no stream (under the lock)."""
        staff = self._by_agency.get(agency_id)
        if staff is None:
            return
        if staff_id in staff and not staff[staff_id]:
            del staff[staff_id]
        if not staff:
            del self._by_agency[agency_id]

    def unsubscribe(self, subscription: Subscription) -> None:
        agency_id, staff_id = subscription.key
        with self._lock:
            mine = self._by_agency.get(agency_id, {}).get(staff_id)
            if mine and subscription in mine:
                del mine[subscription]
                self._count -= 1
                self._forget_empty(agency_id, staff_id)
                self._lock.notify_all()

    @property
    def streams(self) -> int:
        return self._count

    def publish_to_staff(self, agency_id: str, staff_id: str, change: BoardChange) -> int:
        with self._lock:
            targets = list(self._by_agency.get(agency_id, {}).get(staff_id, ()))
        return self._push(targets, change)

    def publish_to_agency(self, agency_id: str, change: BoardChange) -> int:
        with self._lock:
            targets = [s for subs in self._by_agency.get(agency_id, {}).values() for s in subs]
        return self._push(targets, change)

    def _push(self, targets: list[Subscription], change: BoardChange) -> int:
        if targets:
            self._deliver(functools.partial(_push_all, targets, change))
        return len(targets)

    def close(self, wait_s: float = 3.0) -> None:
        """End every stream (the process is stopping) and wait up to `wait_s` for them to finish, so
        the server closes after their last bytes went out."""
        self.closed.set()
        with self._lock:
            targets = [s for staff in self._by_agency.values() for subs in staff.values() for s in subs]
        if targets:
            self._deliver(functools.partial(_end_all, targets))
        with self._lock:
            self._lock.wait_for(lambda: self._count == 0, timeout=wait_s)


def _push_all(targets: list[Subscription], change: BoardChange) -> None:
    for subscription in targets:
        subscription.push(change)


def _end_all(targets: list[Subscription]) -> None:
    for subscription in targets:
        subscription.end()


def changes_of(envelope: Envelope) -> Iterator[tuple[str | None, BoardChange]]:
    """(recipient staff id or None for the whole agency, change) for one delivery event."""
    if envelope.event_type == MESSAGE_DELIVERED:
        message = unpack(envelope, inbox_pb2.MessageDelivered)
        if message.recipient_staff_id:  # a reply to a patient goes to the portal, not to a board
            yield message.recipient_staff_id, BoardChange(message.board_kind or "messages")
    elif envelope.event_type == BOARD_ITEM_DELIVERED:
        item = unpack(envelope, inbox_pb2.BoardItemDelivered)
        if not item.recipient_staff_id:
            raise MalformedEvent("board_item.delivered.v1 without a recipient")
        yield item.recipient_staff_id, BoardChange(item.board_kind or "messages")
    elif envelope.event_type == ANNOUNCEMENT_POSTED:
        unpack(envelope, inbox_pb2.AnnouncementPosted)
        yield None, BoardChange("announcements")
    else:
        raise MalformedEvent(f"unexpected event type {envelope.event_type[:80]}")


class BoardEvents:
    """The consumer feeding the hub; `handle` is idempotent in effect (a repeated push only makes a
    page refetch once more), so no processed-event store is kept."""

    def __init__(self, hub: Hub, amqp_url: str, topology: Topology, instance: str):
        self.hub = hub
        self.consumer = Consumer(
            amqp_url,
            f"web.board-events.{instance}",
            ROUTING_KEYS,
            self.handle,
            topology=topology,
            prefetch=256,
            max_retries=1,
            retry_delay_ms=1_000,
            connection_name="web-board-events",
            queue_expires_ms=QUEUE_EXPIRES_MS,
        )

    def handle(self, envelope: Envelope) -> None:
        if not envelope.agency_id:
            raise MalformedEvent("delivery event without an agency")
        for staff_id, change in changes_of(envelope):
            if staff_id is None:
                self.hub.publish_to_agency(envelope.agency_id, change)
            else:
                self.hub.publish_to_staff(envelope.agency_id, staff_id, change)

    def run(self, stop_event: threading.Event) -> None:
        thread = self.consumer.start()
        try:
            stop_event.wait()
        finally:
            self.consumer.stop()
            thread.join(10)
