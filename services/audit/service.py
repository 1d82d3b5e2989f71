"""The audit service's parts wired together, for the process entry point and for tests; nothing is
started here (no thread, no server, no broker connection).

    audit = build(settings, db)                                   # as the process runs it
    audit = build(settings, db, features=(Queries,))              # a test of one area
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pymongo.database import Database

from services.audit.checkpoints import Checkpointer
from services.audit.components import Components, Feature, Listener
from services.audit.config import SERVICE, AuditSettings
from services.audit.queries import Queries
from services.audit.recording import Recording
from services.audit.store import OUTBOX_COLLECTIONS, AuditStore
from services.audit.witness import Witness
from services.kit.features import Assembled, Worker, background_of
from services.kit.outbox import outbox_collections
from services.kit.security_events import SecurityLog

FEATURES: tuple[Callable[[Components], Feature], ...] = (Recording, Queries)


@dataclass
class Audit(Assembled):
    components: Components

    @property
    def features(self) -> list[Feature]:
        return self.components.features

    @property
    def outbox_collections(self) -> list[str]:
        """Its reads of the trail (and the features' collections): the relay's."""
        return outbox_collections(OUTBOX_COLLECTIONS, self.features)

    @property
    def recording(self) -> Recording | None:
        return self.components.feature(Recording)

    def consuming(self) -> bool:
        """Whether the audit stream is being taken in (readiness); True without the Recording feature."""
        return self.recording is None or self.recording.consumer.consuming

    def background(self) -> list[Worker]:
        return background_of(self.features)

    def listeners(self) -> list[Listener]:
        return [listener for feature in self.features for listener in feature.listeners()]


def build(
    settings: AuditSettings,
    db: Database,
    *,
    security_log: SecurityLog | None = None,
    features: Sequence[Callable[[Components], Feature]] = FEATURES,
) -> Audit:
    """The service over `db`: indexes created, `features` constructed, indexed and attached."""
    store = AuditStore(db)
    store.ensure_indexes()
    witness = None
    if settings.witness_file is not None and settings.signing_key is not None:
        witness = Witness(settings.witness_file, settings.signing_key, db.name)
    checkpointer = Checkpointer(
        store,
        settings.signing_key,
        every_records=settings.checkpoint_every,
        interval_s=settings.checkpoint_interval_s,
        witness=witness,
    )
    components = Components(
        settings=settings,
        store=store,
        checkpointer=checkpointer,
        security_log=security_log or SecurityLog(db, service=SERVICE),
    )
    components.features = [feature(components) for feature in features]
    for feature in components.features:
        feature.ensure_indexes()
        feature.attach()
    return Audit(components)
