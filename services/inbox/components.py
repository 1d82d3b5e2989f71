"""What the inbox process is made of, assembled once and handed to both edges (HTTP and gRPC)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.inbox.board import Board
from services.inbox.config import InboxSettings
from services.inbox.mailbox import Mailbox
from services.inbox.store import InboxStore
from services.kit import features as kit_features
from services.kit.crypto import PhiCipher


@dataclass
class Components:
    settings: InboxSettings
    store: InboxStore
    cipher: PhiCipher
    board: Board
    mailbox: Mailbox
    directory: Any  # DirectoryClient (or a stand-in with the same methods in tests)
    # ServiceTokens for work no user started (event handlers, scheduled jobs): acting_as(identity(agency)).
    service_tokens: Any = None
    # Feature modules (see Feature below), registered by the HTTP edge and run by the process.
    features: list[Any] = field(default_factory=list)
    # The agency's message options (services/inbox/agency_options.AgencyOptions: `.get(agency_id)`),
    # set by that feature, which is constructed first.
    options: Any = None


class Feature(kit_features.Feature[Components]):
    """A part of the mailbox with its own collections, routes and background work
    (announcements, reminders, signature requests, the patient portal, the delivery API).

    Constructed with the Components; `attach()` registers its hooks on the board and mailbox
    (Board.details[kind], Board.extra_unread[folder], Mailbox.reply_handlers[kind]); `blueprint()`
    is its one flask.Blueprint, or None. The rest is services.kit.features.Feature."""
