"""cloud-comms HTTP edge: the application factory and the health blueprint; each feature brings its
own blueprints (Feature.blueprints()).

Routes (each feature's README has the details):
- /healthz, /readyz                                          process and dependency checks
- GET  /api/v1/cloud/direct/<id>[/attachments/<n>]    (staff)    a received Direct message; audited
- POST /api/v1/cloud/direct/outbound                  (staff)    send a Direct message (new, reply, forward)
- GET  /api/v1/cloud/direct/outbound/<id>[/attachments/<n>] (staff) a sent one with its MDN states
- GET  /api/v1/cloud/faxes/<id>[/pdf]                 (staff)    a received fax; audited
- POST /api/v1/cloud/faxes/outbound                   (staff)    Send Fax
- GET  /api/v1/cloud/faxes/outbound/<id>[/pdf]        (staff)    a sent fax with its status history
- POST /api/v1/fax/callbacks/received | /status       (provider, signed)  the eFax provider's callbacks
- GET  /api/v1/cloud/triage/<document id>, POST .../confirm, GET|PUT /api/v1/cloud/triage/settings,
  GET|POST /api/v1/cloud/patients                     (staff / admins)  triage and the patient roster
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
