"""Signature Requests: sign-off on a document by named signers; sign or decline; the requester hears each outcome."""

from __future__ import annotations

from services.inbox.components import Feature


class Signatures(Feature):
    """Not built yet."""
