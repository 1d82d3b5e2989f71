"""What a plugin is to the gateway: Kong's schema for its config, its priority and its phases."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from services.gateway.declarative import typedefs as t
from services.gateway.declarative.schema import Array, EntityCheck, Problems, Record

if TYPE_CHECKING:
    from services.gateway.context import RequestContext
    from services.gateway.model import GatewayModel, PluginInstance
    from services.gateway.responses import Exit


class Plugin:
    """One configured plugin instance. Subclasses define `access`, `header_filter` and/or `body_filter`.

    `access` runs before proxying, in priority order, and may return an Exit to
    answer the client itself (later plugins' `access` then does not run).
    `header_filter` runs for every response of a request the plugin applies to,
    proxied or not, as Kong runs the header_filter phase of every collected plugin.
    `body_filter` runs on the answers the gateway makes itself (a proxied body streams through
    untouched), after every header_filter, and returns the body to send.
    """

    has_access: ClassVar[bool] = False
    has_header_filter: ClassVar[bool] = False
    has_body_filter: ClassVar[bool] = False

    def __init__(self, instance: PluginInstance, model: GatewayModel):
        self.instance = instance
        self.conf = instance.config
        self.model = model

    def access(self, ctx: RequestContext) -> Exit | None:  # pragma: no cover - overridden
        return None

    def header_filter(self, ctx: RequestContext) -> None:  # pragma: no cover - overridden
        return None

    def body_filter(self, ctx: RequestContext, body: bytes) -> bytes:  # pragma: no cover - overridden
        return body

    def describe(self) -> str | None:
        """A start-up note when the local gateway accepts the plugin but does less than Kong."""
        return None


def protocols_field(allowed: tuple[str, ...] = t.PROTOCOLS_HTTP) -> Array:
    return t.protocols(allowed, allowed)


@dataclass(frozen=True)
class PluginSpec:
    name: str
    priority: int
    config: Record
    handler: type[Plugin]
    protocols: tuple[str, ...] = t.PROTOCOLS_HTTP
    # Checks on the whole plugin entity, with Kong's "config.x" field names.
    checks: tuple[EntityCheck, ...] = field(default_factory=tuple)
    # Rewrites Kong applies before validation (deprecated shorthand fields).
    preprocess: Callable[[Any, str, Problems], Any] | None = None
