"""Notifications HTTP edge: the application factory and the health blueprint; each feature brings
its own blueprints (Feature.blueprints()), e.g. lab results for staff and the FHIR partner API.

Routes:
- /healthz, /readyz                                  process and dependency checks
- /metrics                                           Prometheus text (HL7 interface counters); the
                                                     service port only, never routed by the gateway
- /api/v1/lab/results/<order_id>          (staff)    a lab result in full; audited
- /api/v1/partner/lab/<agency_id>/DiagnosticReport   (partner key) a FHIR R4 DiagnosticReport
"""

from __future__ import annotations

from flask import Blueprint, Flask, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pymongo.errors import PyMongoError

from services.kit.http import create_app as create_flask_app
from services.kit.http import error_response
from services.notifications.components import Components


def health_blueprint(components: Components, ready_checks: dict) -> Blueprint:
    health = Blueprint("health", __name__)

    @health.get("/readyz")
    def readyz():
        try:
            components.store.db.command("ping")
        except PyMongoError:
            return error_response(503, "not_ready", "the database does not answer")
        failing = sorted(name for name, check in ready_checks.items() if not check())
        if failing:
            return error_response(503, "not_ready", f"not ready: {', '.join(failing)}")
        return {"status": "ready", "service": "notifications"}

    @health.get("/metrics")
    def metrics():
        return Response(generate_latest(), content_type=CONTENT_TYPE_LATEST)

    return health


def create_app(components: Components, verifier, ready_checks: dict | None = None) -> Flask:
    """The Flask app: kit error handling and /healthz, /readyz, then every feature's blueprints."""
    app = create_flask_app("notifications", verifier, max_body_bytes=components.settings.max_request_bytes)
    app.register_blueprint(health_blueprint(components, ready_checks or {}))
    for feature in components.features:
        for blueprint in feature.blueprints():
            app.register_blueprint(blueprint)
    return app
