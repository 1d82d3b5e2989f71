"""Domain errors with a stable code, shared by the HTTP and gRPC edges."""

from __future__ import annotations

import grpc


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


class Unavailable(DomainError):
    http_status = 503
    grpc_status = grpc.StatusCode.UNAVAILABLE


# gRPC status of a dependency -> the error our edge reports for it.
def from_grpc_error(exc: grpc.RpcError, dependency: str) -> DomainError:
    """The dependency's refusal as our error, keeping its stable code (the `error-code` trailer).

    The dependency's own message is not passed on: it was written for its callers, not ours.
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
    return Unavailable("dependency_unavailable", f"{dependency} is unavailable, try again")
