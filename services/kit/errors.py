"""Domain errors with a stable code, shared by the HTTP and gRPC edges.

Outages are `Unavailable` (HTTP 503 with `Retry-After`, gRPC UNAVAILABLE), with a code that names
what cannot be reached: `database_unavailable` (this service's database), `broker_unavailable`
(RabbitMQ, on a path that publishes itself), `directory_unavailable` (directory over gRPC or HTTP).
`dependency_outage(exc)` is the one place that tells a driver's outage from a bug; the HTTP and
gRPC edges ask it before answering 500 / INTERNAL.
"""

from __future__ import annotations

import grpc
import pika.exceptions
import pymongo.errors


class DomainError(Exception):
    http_status = 400
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, code: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}


class InvalidInput(DomainError):
    http_status = 400
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT


class UnsupportedMediaType(DomainError):
    http_status = 415
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(DomainError):
    http_status = 401
    grpc_status = grpc.StatusCode.UNAUTHENTICATED


class Forbidden(DomainError):
    http_status = 403
    grpc_status = grpc.StatusCode.PERMISSION_DENIED


class NotFound(DomainError):
    http_status = 404
    grpc_status = grpc.StatusCode.NOT_FOUND


class PayloadTooLarge(DomainError):
    http_status = 413
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unprocessable(DomainError):
    """Well-formed but not acceptable as it stands (e.g. no certificate for a recipient)."""

    http_status = 422
    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


class Conflict(DomainError):
    http_status = 409
    grpc_status = grpc.StatusCode.ALREADY_EXISTS


class TooManyRequests(DomainError):
    """Refused for now; the HTTP edge answers 429 with `Retry-After: retry_after_s`."""

    http_status = 429
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, code: str, message: str, retry_after_s: int, details: dict | None = None):
        super().__init__(code, message, details)
        self.retry_after_s = max(1, int(retry_after_s))


RETRY_AFTER_S = 2  # what an outage answer tells a client to wait: a restart or fail-over is seconds


class Unavailable(DomainError):
    """Cannot be done now, may be later: HTTP 503 with `Retry-After: retry_after_s`, gRPC UNAVAILABLE."""

    http_status = 503
    grpc_status = grpc.StatusCode.UNAVAILABLE

    def __init__(self, code: str, message: str, details: dict | None = None, retry_after_s: int = RETRY_AFTER_S):
        super().__init__(code, message, details)
        self.retry_after_s = max(1, int(retry_after_s))


DATABASE_UNAVAILABLE = "database_unavailable"
BROKER_UNAVAILABLE = "broker_unavailable"

# The driver errors that mean "cannot reach it", not "it refused": pymongo's ConnectionFailure covers
# server selection timing out, a connection lost or timed out, a primary stepping down and a full
# pool; OperationFailure (a duplicate key, a bad query, maxTimeMS) is the server's answer, a bug or
# a conflict, and stays what it is. pika's AMQPConnectionError covers a refused, lost or blocked
# connection; a channel closed by the broker is its answer.
_OUTAGES: tuple[tuple[type[BaseException], str, str], ...] = (
    (pymongo.errors.ConnectionFailure, DATABASE_UNAVAILABLE, "the database cannot be reached; try again"),
    (pika.exceptions.AMQPConnectionError, BROKER_UNAVAILABLE, "the message broker cannot be reached; try again"),
)


def dependency_outage(exc: BaseException) -> Unavailable | None:
    """`exc` as the `Unavailable` an edge answers when it is (or was raised from, `raise ... from`)
    a database or broker outage; None for anything else (a bug stays a 500)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, Unavailable):
            return current
        for kind, code, message in _OUTAGES:
            if isinstance(current, kind):
                return Unavailable(code, message)
        current = current.__cause__
    return None


# The statuses that mean the dependency could not answer now (down, overloaded, its own database
# unreachable, or slower than our deadline): `<dependency>_unavailable`, worth a retry.
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


# gRPC status of a dependency -> the error our edge reports for it.
def from_grpc_error(exc: grpc.RpcError, dependency: str) -> DomainError:
    """The dependency's refusal as our error, keeping its stable code (the `error-code` trailer).

    The dependency's own message is not passed on: it was written for its callers, not ours. When it
    could not answer (UNAVAILABLE, DEADLINE_EXCEEDED) the error is `<dependency>_unavailable`
    (`directory_unavailable`) whatever stopped it; its own code, when it gave one (its
    `database_unavailable`), is kept in `details.reason` for whoever diagnoses the outage.
    """
    code = exc.code() if hasattr(exc, "code") else None
    trailers = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
    error_code = str(trailers.get("error-code", ""))
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(error_code or "not_found", f"{dependency}: not found")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(error_code or "invalid_request", f"{dependency} rejected the request")
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return Conflict(error_code or "conflict", f"{dependency}: already exists")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(error_code or "unauthenticated", f"{dependency} did not accept the caller's credentials")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return Forbidden(error_code or "forbidden", f"{dependency} refused the request")
    if code in _UNREACHABLE:
        details = {"dependency": dependency, **({"reason": error_code} if error_code else {})}
        return Unavailable(f"{dependency}_unavailable", f"{dependency} is unavailable, try again", details)
    return Unavailable("dependency_unavailable", f"{dependency} is unavailable, try again")
