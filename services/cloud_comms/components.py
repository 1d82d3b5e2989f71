"""What the cloud-comms process is made of, assembled once and handed to every feature.

A channel (Direct messaging, eFax) is a `Feature` subclass listed in `service.FEATURES`; it creates
its indexes, brings its HTTP blueprints, its background workers (MDN sender, fax polling...) and
names the collections whose documents carry outbox events. A feature taking work in over a socket
of its own (Direct's SMTP listener) exposes it with `listener()`; the process runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.cloud_comms.config import CloudCommsSettings
from services.cloud_comms.store import CloudCommsStore
from services.kit import features as kit_features
from services.kit.crypto import PhiCipher


@dataclass
class Components:
    settings: CloudCommsSettings
    store: CloudCommsStore
    cipher: PhiCipher
    # directory_client.DirectoryClient (or a stand-in with `resolve_address(kind, address)`):
    # resolves a Direct address / fax number to its agency and linked staff (platform identity).
    directory: Any
    # ServiceTokens: work no user started runs as acting_as(service_tokens.identity(agency_id));
    # identity("") is platform scope (directory's ResolveCloudAddress).
    service_tokens: Any
    features: list[Any] = field(default_factory=list)

    def feature(self, kind: type) -> Any:
        """The attached feature of class `kind`, or None."""
        return next((f for f in self.features if isinstance(f, kind)), None)


class Feature(kit_features.Feature[Components]):
    """One channel of the service, constructed with the Components (services.kit.features.Feature).

    A feature with its own socket listener overrides `listeners()`: [(name, run(stop_event),
    ready(timeout) | None)], run by the process like MLLP in notifications."""

    def listeners(self) -> list[tuple[str, Any, Any]]:
        return []
