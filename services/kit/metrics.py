"""Prometheus metrics on a service's own HTTP port: `GET /metrics`, the text exposition of the
process's default registry (prometheus_client). The route belongs on the service port only; the
gateway routes no `/metrics` to a service (gateway/kong.yml), and it carries no PHI, only counts.

    install_metrics_route(app)                     # a Flask app
    install_metrics_route(blueprint)               # or a blueprint the app registers

Metrics themselves are module-level prometheus_client objects of the module that counts them
(services/notifications/interface_metrics.py, services/inbox/counter_check.py); label values must
come from bounded sets.
"""

from __future__ import annotations

from flask import Blueprint, Flask, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

PATH = "/metrics"


def metrics_response(registry: CollectorRegistry = REGISTRY) -> Response:
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


def install_metrics_route(target: Flask | Blueprint, registry: CollectorRegistry = REGISTRY, path: str = PATH) -> None:
    """Serve `registry` (default: the process's) at `path` on `target`, open (no token)."""
    target.add_url_rule(path, "metrics", lambda: metrics_response(registry), methods=["GET"])


def metrics_blueprint(name: str, registry: CollectorRegistry = REGISTRY) -> Blueprint:
    """A blueprint holding only the metrics route, for an app assembled elsewhere."""
    blueprint = Blueprint(name, __name__)
    install_metrics_route(blueprint, registry)
    return blueprint
