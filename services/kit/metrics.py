"""Prometheus metrics on a service's own HTTP port: `GET /metrics`, the text exposition of the
process's default registry (prometheus_client). Every kit app has the route (services.kit.http
`create_app`); the gateway routes no `/metrics` to a service (gateway/kong.yml), and it carries no
PHI, only counts. docs/metrics.md lists every metric.

What the kit counts, so that every service reports it alike (each labelled with `service`):

- HTTP requests by route template (never the concrete path; `unmatched` for a 404 or 405), method
  and status code, and their latency (services.kit.http);
- gRPC calls by full method name and status code, and their latency (services.kit.grpc_server);
- bus events published by routing key; messages consumed by queue and outcome, parked by reason;
  queue depths (ready messages of a consumer's queue, its `.retry` and `.parking`) and consumers,
  sampled by the consumer itself (services.kit.bus);
- outbox backlog per collection: documents pending (counted up to OUTBOX_COUNT_CAP) and the age of
  the oldest, sampled by the relay (services.kit.outbox);
- PHI decryptions by field kind and outcome (services.kit.crypto); open live streams (web).

Label values come from bounded sets: route templates, method names and event types the code
defines, and `BoundedLabel` for anything else (the first `limit` distinct values, then `other`).
A per-instance queue (one that expires with its instance) is labelled without its instance part.
Service-specific metrics are module-level prometheus_client objects of the module that counts them
(services/notifications/interface_metrics.py, services/inbox/counter_check.py).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

from flask import Blueprint, Flask, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# No `<name>_created` series beside every counter and histogram: they double what a scrape carries, and
# Prometheus reads a restart from the counter's reset anyway.
disable_created_metrics()

PATH = "/metrics"
ENDPOINT = "metrics"
UNKNOWN = "unknown"
OTHER = "other"
UNMATCHED = "unmatched"
OUTBOX_COUNT_CAP = 1000

_service = ""


def configure(service: str) -> None:
    """Name the process's service (services.kit.bootstrap.serve does): the `service` label of what
    is counted outside an HTTP app (bus, outbox, PHI decryptions, gRPC)."""
    global _service  # noqa: PLW0603 - one per process, like the logging configuration
    _service = service


def service_name() -> str:
    return _service or UNKNOWN


class BoundedLabel:
    """Label values from an open set, capped: a value shaped like `pattern` is kept while fewer than
    `limit` distinct values have been seen, anything else is `other`; an empty one is `unknown`."""

    def __init__(self, limit: int, pattern: str = r"[a-z0-9][a-z0-9_.:-]{0,79}"):
        self.limit = limit
        self._pattern = re.compile(pattern)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if not value:
            return UNKNOWN
        if value in self._seen:
            return value
        if not self._pattern.fullmatch(value):
            return OTHER
        with self._lock:
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return OTHER


# --- the metrics -------------------------------------------------------------------------------

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "clinic_http_requests",
    "HTTP requests answered, by route template, method and status code",
    ["service", "method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "clinic_http_request_duration_seconds",
    "Time from a request's arrival to its response's headers (a streamed body not included)",
    ["service", "method", "route"],
    buckets=LATENCY_BUCKETS,
)
GRPC_CALLS = Counter(
    "clinic_grpc_server_calls",
    "gRPC calls a service answered, by full method name and status code",
    ["service", "method", "code"],
)
GRPC_DURATION = Histogram(
    "clinic_grpc_server_call_duration_seconds",
    "Time a service took to answer a gRPC call",
    ["service", "method"],
    buckets=LATENCY_BUCKETS,
)
BUS_PUBLISHED = Counter(
    "clinic_bus_events_published",
    "Events the broker confirmed, by routing key (the event type)",
    ["service", "routing_key"],
)
BUS_CONSUMED = Counter(
    "clinic_bus_messages_consumed",
    "Deliveries a consumer finished (acked), by queue and outcome: handled, duplicate, retried, parked",
    ["service", "queue", "outcome"],
)
BUS_PARKED = Counter(
    "clinic_bus_messages_parked",
    "Messages a consumer parked, by queue and reason",
    ["service", "queue", "reason"],
)
BUS_QUEUE_MESSAGES = Gauge(
    "clinic_bus_queue_messages",
    "Messages ready in a consumer's queues (kind: main, retry, parking), sampled by the consumer",
    ["service", "queue", "kind"],
)
BUS_QUEUE_CONSUMERS = Gauge(
    "clinic_bus_queue_consumers",
    "Consumers attached to a consumer's main queue (all replicas), sampled by the consumer",
    ["service", "queue"],
)
OUTBOX_PENDING = Gauge(
    "clinic_outbox_pending_documents",
    f"Documents of an outbox collection with events to publish, counted up to {OUTBOX_COUNT_CAP}",
    ["service", "collection"],
)
OUTBOX_OLDEST_AGE = Gauge(
    "clinic_outbox_oldest_pending_age_seconds",
    "How long the oldest pending document of an outbox collection has been due (0: none)",
    ["service", "collection"],
)
PHI_DECRYPTIONS = Counter(
    "clinic_phi_decryptions",
    "PHI fields opened (services.kit.crypto), by field kind and outcome (ok, failed)",
    ["service", "field", "outcome"],
)
LIVE_STREAMS = Gauge("clinic_live_streams_open", "Live board event streams open on this process", ["service"])

# --- counting, with the labelled children cached (labels() costs a lock and a dict per call) ----

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_http_children: dict[tuple[str, str, str, int], tuple[Callable[[], None], Callable[[float], None]]] = {}
_children: dict[tuple, object] = {}


def _child(metric, *labels: str):
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def observe_http(service: str, method: str, route: str, status: int, seconds: float | None) -> None:
    """One HTTP request answered: `route` is the rule's template or UNMATCHED."""
    key = (service, method, route, status)
    pair = _http_children.get(key)
    if pair is None:
        method_label = method if method in _METHODS else OTHER
        status_label = str(status) if 100 <= status <= 599 else OTHER
        pair = (
            HTTP_REQUESTS.labels(service, method_label, route, status_label).inc,
            HTTP_DURATION.labels(service, method_label, route).observe,
        )
        _http_children[key] = pair
    pair[0]()
    if seconds is not None:
        pair[1](seconds)


def observe_grpc(service: str, method: str, code: str, seconds: float) -> None:
    _child(GRPC_CALLS, service, method, code).inc()
    _child(GRPC_DURATION, service, method).observe(seconds)


_routing_keys = BoundedLabel(200)
_queues = BoundedLabel(200)
_park_reasons = BoundedLabel(50, r"[a-z][a-z_]{0,63}")
_fields = BoundedLabel(64, r"[a-z][a-z_]{0,63}")
_FIELD_KIND = re.compile(r"[a-z_]*")


def published(routing_keys: dict[str, int]) -> None:
    """Events confirmed by the broker: routing key -> how many."""
    service = service_name()
    for routing_key, count in routing_keys.items():
        _child(BUS_PUBLISHED, service, _routing_keys(routing_key)).inc(count)


def queue_label(queue: str, per_instance: bool) -> str:
    """A consumer's queue as labelled: a per-instance queue (`web.board-events.<instance>`) without
    its last part, so a restarted instance continues the same series."""
    name = queue.rsplit(".", 1)[0] if per_instance and "." in queue else queue
    return _queues(name)


def consumed(queue: str, outcome: str) -> None:
    _child(BUS_CONSUMED, service_name(), queue, outcome).inc()


def parked(queue: str, reason: str) -> None:
    service = service_name()
    _child(BUS_CONSUMED, service, queue, "parked").inc()
    _child(BUS_PARKED, service, queue, _park_reasons(reason)).inc()


def queue_depth(queue: str, kind: str, messages: int) -> None:
    _child(BUS_QUEUE_MESSAGES, service_name(), queue, kind).set(messages)


def queue_consumers(queue: str, consumers: int) -> None:
    _child(BUS_QUEUE_CONSUMERS, service_name(), queue).set(consumers)


def outbox_backlog(collection: str, pending: int, oldest_age_s: float) -> None:
    service = service_name()
    _child(OUTBOX_PENDING, service, collection).set(pending)
    _child(OUTBOX_OLDEST_AGE, service, collection).set(oldest_age_s)


def field_kind(field: str) -> str:
    """The kind of a sealed field: its leading lower-case word (`attachment.2.0` -> `attachment`,
    `note:<staff id>` -> `note`), so no record's id reaches a label."""
    return _fields(_FIELD_KIND.match(field).group(0))  # type: ignore[union-attr] - `*` always matches


def phi_decryption(field: str, outcome: str) -> None:
    _child(PHI_DECRYPTIONS, service_name(), field_kind(field), outcome).inc()


def track_live_streams(count: Callable[[], int]) -> None:
    """The open live streams gauge reads `count()` at every scrape."""
    LIVE_STREAMS.labels(service_name()).set_function(count)


# --- the route ---------------------------------------------------------------------------------


def metrics_response(registry: CollectorRegistry = REGISTRY) -> Response:
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


def install_metrics_route(target: Flask | Blueprint, registry: CollectorRegistry = REGISTRY, path: str = PATH) -> None:
    """Serve `registry` (default: the process's) at `path` on `target`, open (no token)."""
    target.add_url_rule(path, ENDPOINT, lambda: metrics_response(registry), methods=["GET"])


def metrics_blueprint(name: str, registry: CollectorRegistry = REGISTRY) -> Blueprint:
    """A blueprint that gives an app the metrics route unless it has one already (every kit app does),
    for an app assembled elsewhere."""
    blueprint = Blueprint(name, __name__)

    def install(state) -> None:
        if ENDPOINT not in state.app.view_functions:
            install_metrics_route(state.app, registry)

    blueprint.record(install)
    return blueprint
