"""Notifications HTTP edge: the application factory and the health blueprint; each feature brings
its own blueprints (Feature.blueprints()), e.g. lab results for staff and the FHIR partner API.

Routes:
- /healthz, /readyz                                  process and dependency checks
- /metrics                                           Prometheus text (the kit's, services.kit.metrics,
                                                     with the HL7 interface counters); the service port
                                                     only, never routed by the gateway
- /api/v1/lab/results/<order_id>          (staff)    a lab result in full; audited
- /api/v1/partner/lab/<agency_id>/DiagnosticReport   (partner key) a FHIR R4 DiagnosticReport
"""

from __future__ import annotations

from collections.abc import Callable

from flask import Blueprint, Flask, current_app

from services.kit.http import create_app as create_flask_app
from services.kit.http import readiness
from services.notifications.components import Components

health = Blueprint("health", __name__)


@health.get("/readyz")
def readyz():
    """Ready when the database answers and every check the process registered passes (the MLLP
    listener runs)."""
    components: Components = current_app.extensions["notifications"]
    ready_checks: dict[str, Callable[[], bool]] = current_app.extensions["notifications.ready_checks"]
    return readiness({"database": lambda: components.store.db.command("ping"), **ready_checks})


def create_app(components: Components, verifier, ready_checks: dict | None = None) -> Flask:
    """The Flask app: kit error handling, /healthz and /metrics, /readyz, then every feature's blueprints."""
    app = create_flask_app("notifications", verifier, max_body_bytes=components.settings.max_request_bytes)
    app.extensions["notifications"] = components
    app.extensions["notifications.ready_checks"] = dict(ready_checks or {})
    app.register_blueprint(health)
    for feature in components.features:
        for blueprint in feature.blueprints():
            app.register_blueprint(blueprint)
    return app
