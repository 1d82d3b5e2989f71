"""Outages are honest 503s: a database, broker or directory that cannot be reached is named in the
error's code, with Retry-After, at the HTTP and gRPC edges; a bug stays a 500 / INTERNAL."""

from __future__ import annotations

import functools
import json

import grpc
import pika.exceptions
import pymongo.errors
import pytest
from flask import Blueprint

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from services.directory import tokens
from services.kit import mongo
from services.kit.auth import AuthError, StaticKeySource, TokenVerifier
from services.kit.errors import (
    RETRY_AFTER_S,
    Conflict,
    NotFound,
    Unavailable,
    dependency_outage,
    from_grpc_error,
)
from services.kit.grpc_server import GrpcServer, ServiceBinding
from services.kit.http import create_app, error_response, require_auth
from services.kit.logs import JsonFormatter
from services.notifications.fhir_errors import answer_errors_in_fhir

DATABASE_OUTAGES = [
    pymongo.errors.ServerSelectionTimeoutError("no server"),
    pymongo.errors.AutoReconnect("connection reset"),
    pymongo.errors.NetworkTimeout("timed out"),
    pymongo.errors.NotPrimaryError("stepped down"),
    pymongo.errors.WaitQueueTimeoutError("pool full"),
    pymongo.errors.ConnectionFailure("refused"),
]
BROKER_OUTAGES = [
    pika.exceptions.AMQPConnectionError("refused"),
    pika.exceptions.StreamLostError("lost"),
    pika.exceptions.ConnectionClosed(320, "CONNECTION_FORCED"),
    pika.exceptions.ConnectionBlockedTimeout(),
]
# The server's (or the broker's) answer, or a bug: not an outage.
NOT_OUTAGES = [
    pymongo.errors.DuplicateKeyError("E11000", 11000),
    pymongo.errors.OperationFailure("bad query", 2),
    pymongo.errors.ExecutionTimeout("maxTimeMS", 50),
    pymongo.errors.WTimeoutError("write concern", 64),
    pymongo.errors.InvalidOperation("closed client"),
    pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND"),
    pika.exceptions.UnroutableError([]),
    KeyError("bug"),
    grpc.RpcError(),
]


@pytest.mark.parametrize("exc", DATABASE_OUTAGES, ids=lambda e: type(e).__name__)
def test_a_database_that_cannot_be_reached_is_database_unavailable(exc):
    outage = dependency_outage(exc)
    assert isinstance(outage, Unavailable)
    assert (outage.code, outage.http_status, outage.grpc_status) == (
        "database_unavailable",
        503,
        grpc.StatusCode.UNAVAILABLE,
    )
    assert outage.retry_after_s == RETRY_AFTER_S and 1 <= RETRY_AFTER_S <= 3


@pytest.mark.parametrize("exc", BROKER_OUTAGES, ids=lambda e: type(e).__name__)
def test_a_broker_that_cannot_be_reached_is_broker_unavailable(exc):
    outage = dependency_outage(exc)
    assert outage is not None and outage.code == "broker_unavailable" and outage.retry_after_s == RETRY_AFTER_S


@pytest.mark.parametrize("exc", NOT_OUTAGES, ids=lambda e: type(e).__name__)
def test_answers_and_bugs_are_not_outages(exc):
    assert dependency_outage(exc) is None


def test_an_outage_raised_as_another_error_is_still_found():
    try:
        try:
            raise pymongo.errors.ServerSelectionTimeoutError("no server")
        except pymongo.errors.PyMongoError as inner:
            raise RuntimeError("store failed") from inner
    except RuntimeError as outer:
        assert dependency_outage(outer).code == "database_unavailable"
    # Only an explicit cause counts: a bug raised while handling an outage is still a bug.
    try:
        try:
            raise pymongo.errors.AutoReconnect("reset")
        except pymongo.errors.PyMongoError:
            raise KeyError("bug in the handler")  # noqa: B904 - the implicit context is the point
    except KeyError as bug:
        assert dependency_outage(bug) is None
    unavailable = Unavailable("directory_unavailable", "directory is unavailable")
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = unavailable
    assert dependency_outage(wrapped) is unavailable


def test_unavailable_always_says_when_to_try_again():
    assert Unavailable("busy", "try again").retry_after_s == RETRY_AFTER_S
    assert Unavailable("busy", "try again", {"k": "v"}, retry_after_s=0).retry_after_s == 1
    assert Unavailable("busy", "try again", retry_after_s=3).retry_after_s == 3


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, error_code: str = ""):
        self._code = code
        self._trailers = (("error-code", error_code),) if error_code else ()

    def code(self):
        return self._code

    def trailing_metadata(self):
        return self._trailers


@pytest.mark.parametrize(
    ("status", "trailer", "details"),
    [
        (
            grpc.StatusCode.UNAVAILABLE,
            "database_unavailable",
            {"dependency": "directory", "reason": "database_unavailable"},
        ),
        (grpc.StatusCode.UNAVAILABLE, "", {"dependency": "directory"}),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", {"dependency": "directory"}),
    ],
)
def test_a_directory_that_cannot_answer_is_directory_unavailable(status, trailer, details):
    error = from_grpc_error(FakeRpcError(status, trailer), "directory")
    assert isinstance(error, Unavailable)
    assert (error.code, error.http_status, error.details) == ("directory_unavailable", 503, details)
    assert error.retry_after_s == RETRY_AFTER_S
    assert "database" not in error.message  # directory's own message is not passed on


def test_other_directory_answers_keep_their_meaning():
    not_found = from_grpc_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, "staff_not_found"), "directory")
    assert isinstance(not_found, NotFound) and not_found.code == "staff_not_found"
    conflict = from_grpc_error(FakeRpcError(grpc.StatusCode.ALREADY_EXISTS), "directory")
    assert isinstance(conflict, Conflict)
    internal = from_grpc_error(FakeRpcError(grpc.StatusCode.INTERNAL), "directory")
    assert isinstance(internal, Unavailable) and internal.code == "dependency_unavailable"


# --- the HTTP edge -----------------------------------------------------------------------------------------
class RevocationsDown:
    """directory's revocation check while its database is down (services.directory.sessions)."""

    def is_revoked(self, session_id: str) -> bool:
        try:
            raise pymongo.errors.ServerSelectionTimeoutError("no server")
        except pymongo.errors.PyMongoError as exc:
            raise AuthError("auth_unavailable", "the session cannot be checked now") from exc


class KeysDown:
    def is_revoked(self, session_id: str) -> bool:
        raise AuthError("auth_unavailable", "signing keys are unavailable")


@functools.cache
def keys() -> tokens.KeySet:
    return tokens.KeySet.from_pem(tokens.generate_private_key_pem())


def staff_token() -> str:
    return tokens.issue_access_token(
        keys(), staff_id="stf_a", agency_id="agy_a", roles=["staff"], name="A", session_id="ses_a", ttl_s=900
    ).token


def verifier(revoked) -> TokenVerifier:
    return TokenVerifier(StaticKeySource(keys().verification_keys), revoked=revoked)


def edge(revoked=None):
    app = create_app("test", verifier(revoked))

    @app.get("/database")
    def database():
        raise pymongo.errors.ServerSelectionTimeoutError("127.0.0.1:27017: [Errno 111] Connection refused")

    @app.get("/broker")
    def broker():
        raise pika.exceptions.AMQPConnectionError("refused")

    @app.get("/directory")
    def directory():
        raise from_grpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "database_unavailable"), "directory")

    @app.get("/duplicate")
    def duplicate():
        raise pymongo.errors.DuplicateKeyError("E11000", 11000)

    @app.get("/busy")
    def busy():
        raise Unavailable("busy", "changed by another request; try again", retry_after_s=1)

    @app.get("/plain")
    def plain():
        return error_response(503, "directory_unavailable", "try again shortly")

    @app.get("/guarded")
    @require_auth
    def guarded():
        return {"ok": True}

    return app.test_client()


@pytest.mark.parametrize(
    ("path", "code"),
    [("/database", "database_unavailable"), ("/broker", "broker_unavailable"), ("/directory", "directory_unavailable")],
)
def test_http_outages_are_503_naming_the_dependency_with_retry_after(path, code, caplog):
    reply = edge().get(path)
    assert reply.status_code == 503
    assert reply.get_json()["code"] == code and reply.get_json()["message"]
    assert reply.headers["Retry-After"] == str(RETRY_AFTER_S)
    body = reply.get_data(as_text=True)
    assert "Traceback" not in body and "27017" not in body  # the driver's text stays inside
    # An outage is one warning with its code, not an "unhandled error" with a stack trace.
    formatter = JsonFormatter("test")
    lines = [formatter.format(r) for r in caplog.records if r.name == "http"]
    assert not any("unhandled error" in line for line in lines)
    if path != "/directory":
        assert any("dependency unavailable" in line and f'"code": "{code}"' in line for line in lines)
        assert not any("Traceback" in line or "27017" in line for line in lines)


def test_a_blueprint_with_its_own_error_answers_is_given_the_outage_too():
    """A FHIR route answers every refusal as an OperationOutcome (its own handler for Exception): an
    outage reaches that handler as the Unavailable it is, not as a bug."""
    app = create_app("test", verifier=None)
    fhir = Blueprint("fhir", __name__, url_prefix="/fhir")
    answer_errors_in_fhir(fhir)

    @fhir.post("/DiagnosticReport")
    def diagnostic_report():
        raise pymongo.errors.AutoReconnect("connection reset")

    @fhir.post("/Bug")
    def bug():
        raise KeyError("bug")

    app.register_blueprint(fhir)
    client = app.test_client()
    reply = client.post("/fhir/DiagnosticReport")
    assert reply.status_code == 503 and reply.headers["Retry-After"] == str(RETRY_AFTER_S)
    outcome = json.loads(reply.get_data())
    assert outcome["code"] == "database_unavailable" and outcome["resourceType"] == "OperationOutcome"
    assert client.post("/fhir/Bug").status_code == 500


def test_a_bug_is_still_a_500_without_retry_after():
    reply = edge().get("/duplicate")
    assert reply.status_code == 500 and reply.get_json()["code"] == "internal_error"
    assert "Retry-After" not in reply.headers


def test_every_503_says_when_to_try_again():
    busy = edge().get("/busy")
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
    plain = edge().get("/plain")
    assert plain.status_code == 503 and plain.headers["Retry-After"] == str(RETRY_AFTER_S)


def test_a_token_that_cannot_be_checked_for_its_database_is_database_unavailable():
    headers = {"Authorization": f"Bearer {staff_token()}"}
    reply = edge(RevocationsDown()).get("/guarded", headers=headers)
    assert reply.status_code == 503 and reply.get_json()["code"] == "database_unavailable"
    assert reply.headers["Retry-After"] == str(RETRY_AFTER_S)
    other = edge(KeysDown()).get("/guarded", headers=headers)
    assert other.status_code == 503 and other.get_json()["code"] == "auth_unavailable"
    assert edge().get("/guarded", headers=headers).get_json() == {"ok": True}


# --- the gRPC edge -----------------------------------------------------------------------------------------
SERVICE = "clinic.directory.v1.DirectoryService"


class Servicer(directory_pb2_grpc.DirectoryServiceServicer):
    def GetStaff(self, request, context):
        raise pymongo.errors.AutoReconnect("connection reset")

    def ListStaff(self, request, context):
        raise pika.exceptions.StreamLostError("lost")

    def GetAgencySettings(self, request, context):
        raise KeyError("bug")


def grpc_edge(revoked=None):
    server = GrpcServer(
        [ServiceBinding(directory_pb2_grpc.add_DirectoryServiceServicer_to_server, Servicer(), SERVICE)],
        verifier(revoked),
        port=0,
        tls=None,
    )
    server.start()
    return server


@pytest.fixture(scope="module")
def stub():
    server = grpc_edge()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield directory_pb2_grpc.DirectoryServiceStub(channel)
    channel.close()
    server.stop(0)


def call(method, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        method(request, metadata=[("authorization", f"Bearer {staff_token()}")], timeout=5)
    return caught.value


def code_of(error: grpc.RpcError) -> str:
    return dict(error.trailing_metadata() or ()).get("error-code", "")


def test_grpc_outages_are_unavailable_with_the_code_in_the_trailer(stub):
    database = call(stub.GetStaff, directory_pb2.GetStaffRequest(staff_ids=["stf_a"]))
    assert database.code() == grpc.StatusCode.UNAVAILABLE and code_of(database) == "database_unavailable"
    broker = call(stub.ListStaff, directory_pb2.ListStaffRequest())
    assert broker.code() == grpc.StatusCode.UNAVAILABLE and code_of(broker) == "broker_unavailable"
    bug = call(stub.GetAgencySettings, directory_pb2.GetAgencySettingsRequest())
    assert bug.code() == grpc.StatusCode.INTERNAL and code_of(bug) == ""
    # What the caller makes of it: its dependency is unavailable, and why.
    mapped = from_grpc_error(database, "directory")
    assert (mapped.code, mapped.details["reason"]) == ("directory_unavailable", "database_unavailable")


def test_a_grpc_token_that_cannot_be_checked_for_its_database_is_database_unavailable():
    server = grpc_edge(RevocationsDown())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            error = call(directory_pb2_grpc.DirectoryServiceStub(channel).GetStaff, directory_pb2.GetStaffRequest())
    finally:
        server.stop(0)
    assert error.code() == grpc.StatusCode.UNAVAILABLE and code_of(error) == "database_unavailable"


# --- the database client -----------------------------------------------------------------------------------
def test_the_database_client_gives_up_within_two_seconds_unless_the_uri_says_otherwise():
    options = mongo.client_options("mongodb://127.0.0.1:27017/")
    assert options["serverSelectionTimeoutMS"] <= 1500  # pymongo looks again every 0.5 s: <= 2 s in all
    assert "socketTimeoutMS" not in options  # a long query on a healthy server is never cut off
    given = mongo.client_options("mongodb://a:1,b:2/?replicaSet=rs&serverselectiontimeoutms=5000")
    assert "serverSelectionTimeoutMS" not in given and given["connectTimeoutMS"] == options["connectTimeoutMS"]
