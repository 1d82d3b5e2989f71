"""A service's features: the extension point every service with several areas shares.

A feature is one area of a service (inbox's reminders, notifications' lab results, ...) with its
own collections, HTTP routes and background work. It is constructed with the service's
`Components` (whatever that service assembles once: settings, store, cipher, clients) and asked,
in this order, by the service's `build()` and its process:

    feature.ensure_indexes()      # once, at start
    feature.attach()              # register its hooks on the shared parts
    feature.blueprints()          # its flask.Blueprints, registered by the HTTP edge
    feature.background()          # (name, run(stop_event)) workers the process runs
    feature.outbox_collections    # collections whose documents carry outbox events (the relay's)

A service's own `components.Feature` subclasses this one to name its Components type and what
`attach()` may hook into there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["Assembled", "Feature", "Worker", "background_of"]

C = TypeVar("C")

# A background worker: (name, run(stop_event)); `run` returns soon after stop_event is set.
Worker = tuple[str, Callable[[threading.Event], None]]


class Feature(Generic[C]):
    """One area of a service, constructed with the service's Components."""

    # Collections whose documents carry outbox events (the relay scans them).
    outbox_collections: tuple[str, ...] = ()

    def __init__(self, components: C):
        self.components = components

    def ensure_indexes(self) -> None:
        """Create this feature's indexes (called once at start)."""

    def attach(self) -> None:
        """Register this feature's hooks on the service's shared parts."""

    def blueprints(self) -> list:
        """The feature's flask.Blueprints (one per area); by default its one `blueprint()`, if any."""
        blueprint = self.blueprint()
        return [] if blueprint is None else [blueprint]

    def blueprint(self):
        """A feature with a single area may override this instead of `blueprints()`: its
        flask.Blueprint, or None."""
        return None

    def background(self) -> list[Worker]:
        """(name, run(stop_event)) workers the process runs until it stops."""
        return []


def background_of(features: Iterable[Feature]) -> list[Worker]:
    """Every feature's background workers, in feature order."""
    return [worker for feature in features for worker in feature.background()]


@dataclass
class Assembled:
    """Base of what a service's `build()` returns: `opened` holds the clients build() opened itself
    (not those it was given), which `close()` closes; the process closes it last."""

    opened: list[Any] = field(default_factory=list, kw_only=True)

    def close(self) -> None:
        for client in self.opened:
            client.close()
