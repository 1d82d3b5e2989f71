"""The Flask edge never answers with HTML or a stack trace, whatever goes wrong."""

from __future__ import annotations

import pytest

from services.kit.errors import Conflict, NotFound
from services.kit.http import create_app
from services.kit.logs import JsonFormatter


@pytest.fixture
def client():
    app = create_app("test", verifier=None, max_body_bytes=1024)

    @app.post("/boom")
    def boom():
        raise RuntimeError("secret patient detail in an exception")

    @app.get("/missing")
    def missing():
        raise NotFound("message_not_found", "no such message")

    @app.get("/conflict")
    def conflict():
        raise Conflict("label_exists", "a label with that name exists", {"field": "name"})

    @app.post("/echo")
    def echo():
        from flask import request

        return {"size": len(request.get_data())}

    return app.test_client()


def test_unexpected_errors_are_generic_json_500(client, caplog):
    reply = client.post("/boom")
    assert reply.status_code == 500
    assert reply.get_json() == {"code": "internal_error", "message": "internal error; the request was not completed"}
    assert "secret patient detail" not in reply.get_data(as_text=True)
    assert "Traceback" not in reply.get_data(as_text=True)
    # The failure is logged (type and frames) without the exception's text.
    formatter = JsonFormatter("test")
    lines = [formatter.format(record) for record in caplog.records if record.name == "http"]
    assert any('"error_type": "RuntimeError"' in line for line in lines)
    assert not any("secret patient detail" in line for line in lines)


def test_domain_errors_keep_their_code_and_details(client):
    assert client.get("/missing").get_json() == {"code": "message_not_found", "message": "no such message"}
    reply = client.get("/conflict")
    assert reply.status_code == 409 and reply.get_json()["details"] == {"field": "name"}


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [("get", "/nowhere", 404, "not_found"), ("get", "/boom", 405, "method_not_allowed")],
)
def test_routing_errors_are_json(client, method, path, status, code):
    reply = getattr(client, method)(path)
    assert reply.status_code == status
    assert reply.content_type == "application/json"
    assert reply.get_json()["code"] == code


def test_a_method_not_allowed_names_the_allowed_ones(client):
    reply = client.get("/boom")
    assert reply.status_code == 405
    assert "GET" not in reply.headers["Allow"] and reply.headers["Allow"]


def test_oversize_bodies_are_refused_with_413_json(client):
    reply = client.post("/echo", data=b"x" * 2048, content_type="application/octet-stream")
    assert reply.status_code == 413
    assert reply.get_json()["code"] == "payload_too_large"
    assert client.post("/echo", data=b"x" * 100).get_json() == {"size": 100}


def test_every_answer_carries_a_correlation_id_and_no_store(client):
    reply = client.get("/healthz", headers={"X-Correlation-ID": "abc-123"})
    assert reply.headers["X-Correlation-ID"] == "abc-123"
    assert reply.headers["Cache-Control"] == "no-store"
    generated = client.get("/healthz", headers={"X-Correlation-ID": "x" * 500}).headers["X-Correlation-ID"]
    assert len(generated) == 32  # an unreasonable incoming id is replaced


def test_every_service_answers_readiness_in_one_shape():
    app = create_app("notifications", verifier=None)
    state = {"database": True}

    def unreachable():
        raise ConnectionError("no answer")

    @app.get("/ready-or-not")
    def ready_or_not():
        from services.kit.http import readiness

        return readiness({"database": lambda: state["database"], "listener": lambda: True}, streams=3)

    @app.get("/raising")
    def raising():
        from services.kit.http import readiness

        return readiness({"database": unreachable})

    client = app.test_client()
    ready = client.get("/ready-or-not")
    assert ready.status_code == 200
    assert ready.get_json() == {"status": "ready", "service": "notifications", "streams": 3}
    state["database"] = False
    refused = client.get("/ready-or-not")
    assert refused.status_code == 503
    assert refused.get_json()["code"] == "not_ready" and refused.get_json()["details"] == {"failing": ["database"]}
    raised = client.get("/raising")
    assert raised.status_code == 503 and raised.get_json()["details"] == {"failing": ["database"]}
