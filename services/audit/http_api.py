"""audit's HTTP edge: the application factory and the health blueprint; the `Queries` feature
brings the auditors' routes (services/audit/queries.py).

- /healthz, /readyz     process and dependency checks (ready: consuming the audit stream, database answers)
- /api/v1/audit/...     records, export, checkpoints, verify, keys (through the gateway, jwt)
"""

from __future__ import annotations

from collections.abc import Callable

from flask import Blueprint, Flask, current_app

from services.audit.components import Components
from services.kit.http import create_app as create_flask_app
from services.kit.http import readiness

health = Blueprint("health", __name__)


@health.get("/readyz")
def readyz():
    components: Components = current_app.extensions["audit"]
    checks: dict[str, Callable[[], object]] = current_app.extensions["audit.ready_checks"]
    return readiness({"database": lambda: components.store.db.command("ping"), **checks})


def create_app(components: Components, verifier, ready_checks: dict | None = None) -> Flask:
    """The Flask app: kit error handling and /healthz, /readyz, then every feature's blueprints."""
    app = create_flask_app("audit", verifier, max_body_bytes=components.settings.max_request_bytes)
    app.extensions["audit"] = components
    app.extensions["audit.ready_checks"] = dict(ready_checks or {})
    app.register_blueprint(health)
    for feature in components.features:
        for blueprint in feature.blueprints():
            app.register_blueprint(blueprint)
    return app
