"""What the audit process is made of, assembled once by `service.build()` and handed to every feature.

A feature (services.kit.features.Feature) is one area: `Recording` takes the audit stream in and
signs checkpoints, `Queries` answers auditors. A feature that takes work in from the bus exposes
it with `listeners()`; the process runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.audit.checkpoints import Checkpointer
from services.audit.config import AuditSettings
from services.audit.store import AuditStore
from services.kit import features as kit_features
from services.kit.security_events import SecurityLog


@dataclass
class Components:
    settings: AuditSettings
    store: AuditStore
    checkpointer: Checkpointer
    # Refused reads of the trail are security events of the audit service (its outbox).
    security_log: SecurityLog
    features: list[Any] = field(default_factory=list)

    def feature(self, kind: type) -> Any:
        """The attached feature of class `kind`, or None."""
        return next((f for f in self.features if isinstance(f, kind)), None)


# A listener: (name, run(stop_event), stop(), ready(timeout)); what the process runs to take work in.
Listener = tuple[str, Any, Any, Any]


class Feature(kit_features.Feature[Components]):
    def listeners(self) -> list[Listener]:
        return []
