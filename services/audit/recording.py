"""The `Recording` feature: the audit stream's consumer (services.audit.ingest) and the timed
checkpoint pass (services.audit.checkpoints), which also appends the witness line
(services.audit.witness)."""

from __future__ import annotations

from services.audit.components import Feature, Listener
from services.audit.config import SERVICE
from services.audit.ingest import Recorder, build_consumer
from services.kit.features import Worker
from services.kit.processed_events import ProcessedEvents


class Recording(Feature):
    def __init__(self, components):
        super().__init__(components)
        settings = components.settings
        self.recorder = Recorder(
            components.store,
            components.checkpointer,
            max_skew_ms=settings.max_clock_skew_ms,
            security_log=components.security_log,
            queue=settings.queue,
        )
        self.consumer = build_consumer(
            components.settings, self.recorder, ProcessedEvents(components.store.db, SERVICE)
        )

    def listeners(self) -> list[Listener]:
        # Stopping lets the batch in hand finish; unacked prefetched events go back to the queue.
        consumer = self.consumer
        return [("audit-consumer", lambda _stop: consumer.run(), consumer.stop, consumer.wait_until_consuming)]

    def background(self) -> list[Worker]:
        return [("checkpoints", self.components.checkpointer.run)]
