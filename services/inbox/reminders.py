"""Reminders a staff member sets for themself: hidden until due, then unread in Reminders; snooze, complete."""

from __future__ import annotations

from services.inbox.components import Feature


class Reminders(Feature):
    """Not built yet."""
