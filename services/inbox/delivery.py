"""The delivery API: other services put items on boards
(gRPC DeliverItem and the board_item.delivery_requested.v1 event)."""

from __future__ import annotations

from services.inbox.components import Feature


class Delivery(Feature):
    """Not built yet."""
