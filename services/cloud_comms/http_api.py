"""cloud-comms HTTP edge: the application factory and the health blueprint; each feature brings its
own blueprints (Feature.blueprints()).

Routes:
- /healthz, /readyz                                     process and dependency checks
- /api/v1/cloud/direct/<id>                  (staff)    a Direct message (text, attachments list); audited
- /api/v1/cloud/direct/<id>/attachments/<n>  (staff)    one attachment's bytes; audited
"""

from __future__ import annotations

from collections.abc import Callable

from flask import Blueprint, Flask, current_app

from services.cloud_comms.components import Components
from services.kit.http import create_app as create_flask_app
from services.kit.http import readiness

health = Blueprint("health", __name__)


@health.get("/readyz")
def readyz():
    """Ready when the database answers and every check the process registered passes (the SMTP
    listener runs)."""
    components: Components = current_app.extensions["cloud-comms"]
    ready_checks: dict[str, Callable[[], bool]] = current_app.extensions["cloud-comms.ready_checks"]
    return readiness({"database": lambda: components.store.db.command("ping"), **ready_checks})


def create_app(components: Components, verifier, ready_checks: dict | None = None) -> Flask:
    """The Flask app: kit error handling and /healthz, /readyz, then every feature's blueprints."""
    app = create_flask_app("cloud-comms", verifier, max_body_bytes=components.settings.max_request_bytes)
    app.extensions["cloud-comms"] = components
    app.extensions["cloud-comms.ready_checks"] = dict(ready_checks or {})
    app.register_blueprint(health)
    for feature in components.features:
        for blueprint in feature.blueprints():
            app.register_blueprint(blueprint)
    return app
