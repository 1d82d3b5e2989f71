"""Live board updates: delivery events from the bus pushed to the recipient's open pages.

Each web replica consumes its own queue (`web.board-events.<instance>`, expiring once the replica
is gone) bound to the delivery events, so every replica hears every delivery and pushes it to the
pages connected to it. What reaches the browser is only "your board changed in folder X": the
page then asks the API, which shows what the API would show.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
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


class Subscription:
    def __init__(self, hub: Hub, key: tuple[str, str]):
        self.hub = hub
        self.key = key
        self.changes: queue.Queue[BoardChange | None] = queue.Queue(maxsize=SUBSCRIBER_BACKLOG)
        self.ended = threading.Event()  # replaced by a newer page of the same person, or the hub closed

    def end(self) -> None:
        self.ended.set()
        self.push(None)

    def push(self, change: BoardChange | None) -> None:
        try:
            self.changes.put_nowait(change)
        except queue.Full:
            pass  # the page refetches on the changes already queued

    def next(self, timeout_s: float) -> BoardChange | None:
        """The next change, or None after `timeout_s` (time for a heartbeat) or when the hub closes."""
        try:
            return self.changes.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.hub.unsubscribe(self)


class Hub:
    """Open event streams by (agency, staff member); thread-safe."""

    def __init__(self, max_streams: int, max_streams_per_staff: int):
        self.max_streams = max_streams
        self.max_streams_per_staff = max_streams_per_staff
        self._lock = threading.Condition()
        # Insertion-ordered (oldest first) streams per (agency, staff member).
        self._by_staff: dict[tuple[str, str], dict[Subscription, None]] = {}
        self._count = 0
        self.closed = threading.Event()

    def subscribe(self, agency_id: str, staff_id: str) -> Subscription:
        """A new stream for this person. A person over their limit loses their oldest stream (a page
        closed without the server noticing yet, most likely); the process over its limit refuses."""
        key = (agency_id, staff_id)
        evicted = None
        if self.closed.is_set():  # stopping: the page tries again, on another replica
            raise TooManyStreams
        with self._lock:
            mine = self._by_staff.setdefault(key, {})
            if len(mine) >= self.max_streams_per_staff:
                evicted = next(iter(mine))
                del mine[evicted]
                self._count -= 1
            if self._count >= self.max_streams:
                if not mine:
                    del self._by_staff[key]
                raise TooManyStreams
            subscription = Subscription(self, key)
            mine[subscription] = None
            self._count += 1
        if evicted is not None:
            evicted.end()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            mine = self._by_staff.get(subscription.key)
            if mine and subscription in mine:
                del mine[subscription]
                self._count -= 1
                if not mine:
                    del self._by_staff[subscription.key]
                self._lock.notify_all()

    @property
    def streams(self) -> int:
        return self._count

    def publish_to_staff(self, agency_id: str, staff_id: str, change: BoardChange) -> int:
        with self._lock:
            targets = list(self._by_staff.get((agency_id, staff_id), ()))
        for subscription in targets:
            subscription.push(change)
        return len(targets)

    def publish_to_agency(self, agency_id: str, change: BoardChange) -> int:
        with self._lock:
            targets = [s for (agency, _), subs in self._by_staff.items() if agency == agency_id for s in subs]
        for subscription in targets:
            subscription.push(change)
        return len(targets)

    def close(self, wait_s: float = 3.0) -> None:
        """End every stream (the process is stopping) and wait up to `wait_s` for them to finish, so
        the HTTP server closes after their last bytes went out."""
        self.closed.set()
        with self._lock:
            targets = [s for subs in self._by_staff.values() for s in subs]
        for subscription in targets:
            subscription.end()
        with self._lock:
            self._lock.wait_for(lambda: self._count == 0, timeout=wait_s)


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
