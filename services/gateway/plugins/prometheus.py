"""The prometheus plugin (Kong 3.9 schema). Production Kong exports metrics on its status listener;
the local gateway validates the configuration and collects nothing (it has no status listener)."""

from __future__ import annotations

from services.gateway.declarative import typedefs as t
from services.gateway.declarative.schema import Boolean, Record
from services.gateway.plugins.base import Plugin, PluginSpec


class PrometheusPlugin(Plugin):
    def describe(self) -> str | None:
        return "prometheus: configuration valid; metrics are exported by production Kong only"


CONFIG = Record(
    fields={
        name: Boolean(default=False)
        for name in ("per_consumer", "status_code_metrics", "ai_metrics", "latency_metrics", "bandwidth_metrics",
                     "upstream_health_metrics")
    }
)

SPEC = PluginSpec(name="prometheus", priority=13, config=CONFIG, handler=PrometheusPlugin, protocols=t.PROTOCOLS)
