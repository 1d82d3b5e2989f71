"""Patient Portal Messages: the portal (a partner system, key-auth at the gateway) writes and
reads on behalf of a patient."""

from __future__ import annotations

from services.inbox.components import Feature


class Portal(Feature):
    """Not built yet."""
