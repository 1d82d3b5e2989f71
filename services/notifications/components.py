"""What the notifications process is made of, assembled once and handed to every feature.

A feature (lab results, schedule changes, compliance alerts) is a `Feature` subclass listed in
`service.FEATURES`; it creates its indexes, registers the HL7 v2 message types it takes, brings
its own HTTP blueprints and background workers, and names the collections whose documents carry
outbox events. See README.md, "Extending the service".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.kit import features as kit_features
from services.kit.crypto import PhiCipher
from services.notifications.config import NotificationsSettings
from services.notifications.mllp import MessageTypes
from services.notifications.registrations import Registrations
from services.notifications.store import NotificationsStore


@dataclass
class Components:
    settings: NotificationsSettings
    store: NotificationsStore
    cipher: PhiCipher
    directory: Any  # directory_client.DirectoryClient (or a stand-in with the same methods in tests)
    # ServiceTokens: work no user started (an HL7 message, a partner's request) runs as
    # acting_as(service_tokens.identity(agency_id)).
    service_tokens: Any
    registrations: Registrations
    message_types: MessageTypes = field(default_factory=MessageTypes)
    features: list[Any] = field(default_factory=list)


class Feature(kit_features.Feature[Components]):
    """One area of the service, constructed with the Components; `attach()` registers its HL7 v2
    handlers: self.components.message_types.register(type, trigger, handler). The rest is
    services.kit.features.Feature."""
