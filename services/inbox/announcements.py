"""Agency Announcement: one document per announcement, read and acknowledgement state per staff member."""

from __future__ import annotations

from services.inbox.components import Feature


class Announcements(Feature):
    """Not built yet."""
