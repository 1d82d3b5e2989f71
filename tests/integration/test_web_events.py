"""Live board events on the real broker: every web replica consumes its own expiring queue, so each
hears every delivery and pushes it to the pages connected to it, and nothing else."""

from __future__ import annotations

from clinic.inbox.v1 import inbox_pb2
from services.kit.bus import Publisher
from services.kit.events import new_envelope
from services.web.live import QUEUE_EXPIRES_MS, BoardEvents, Hub
from tests.integration.test_bus_queue_expiry import list_queues
from tests.waits import wait_until


def changes(subscription) -> list[str]:
    """The changes pushed to the page since the last look (the hub pushes in the consumer's thread)."""
    return [change.folder for change in subscription.take()]


def test_each_replica_hears_every_delivery_and_tells_only_its_recipients_pages(event_bus):
    replicas = [BoardEvents(Hub(10, 3), event_bus.amqp_url, event_bus.topology, name) for name in ("r1", "r2")]
    event_bus.queues += [
        q for r in replicas for q in (r.consumer.queue, r.consumer.retry_queue, r.consumer.parking_queue)
    ]
    kim = [r.hub.subscribe("agy_riverbend", "stf_kim") for r in replicas]
    lakeside_kim = replicas[0].hub.subscribe("agy_lakeside", "stf_kim")
    colleague = replicas[1].hub.subscribe("agy_riverbend", "stf_chen")
    publisher = Publisher(event_bus.amqp_url, event_bus.topology)
    with replicas[0].consumer.running(), replicas[1].consumer.running():
        declared = list_queues(event_bus.amqp_url)
        for replica in replicas:
            assert "x-expires" in declared[replica.consumer.queue]
            assert str(QUEUE_EXPIRES_MS) in declared[replica.consumer.queue]
        message = inbox_pb2.MessageDelivered(recipient_staff_id="stf_kim", board_kind="messages")
        lab = inbox_pb2.BoardItemDelivered(recipient_staff_id="stf_kim", board_kind="lab", item_id="itm_1")
        publisher.publish(
            [
                new_envelope("message.delivered.v1", message, agency_id="agy_riverbend", producer="inbox"),
                new_envelope("board_item.delivered.v1", lab, agency_id="agy_riverbend", producer="inbox"),
                new_envelope(
                    "announcement.posted.v1",
                    inbox_pb2.AnnouncementPosted(announcement_id="ann_1"),
                    agency_id="agy_riverbend",
                    producer="inbox",
                ),
            ]
        )
        seen: dict[int, list[str]] = {0: [], 1: []}

        def both_replicas_pushed_all_three() -> bool:
            for i in seen:
                seen[i] += changes(kim[i])
            return all(len(folders) >= 3 for folders in seen.values())

        wait_until(both_replicas_pushed_all_three, timeout=10)
        assert seen[0] == seen[1] == ["messages", "lab", "announcements"]
        assert changes(colleague) == ["announcements"]  # the whole agency's, not Kim's own
        assert changes(lakeside_kim) == []  # same staff id in another agency hears nothing
    publisher.close()
