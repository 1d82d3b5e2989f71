"""What the inbox process is made of, assembled once and handed to both edges (HTTP and gRPC)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.inbox.board import Board
from services.inbox.config import InboxSettings
from services.inbox.mailbox import Mailbox
from services.inbox.store import InboxStore
from services.kit.crypto import PhiCipher


@dataclass
class Components:
    settings: InboxSettings
    store: InboxStore
    cipher: PhiCipher
    board: Board
    mailbox: Mailbox
    directory: Any  # DirectoryClient (or a stand-in with the same methods in tests)
    # Feature modules; each has .blueprint() -> flask.Blueprint, registered by the HTTP edge.
    features: list[Any] = field(default_factory=list)
