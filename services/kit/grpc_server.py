"""gRPC server bootstrap shared by every service.

grpcio's own health service and server reflection; an interceptor that sets the
correlation id, verifies the caller's token (health and reflection are open),
decodes requests itself so malformed protobuf is INVALID_ARGUMENT, and maps
domain errors to status codes without leaking internals.

`open_methods` names (full method names, "/package.Service/Method") the few
methods a caller reaches without a bearer token, such as directory's
IssueServiceToken: they skip token verification (no identity is set) but still
get the correlation id, safe decoding and error mapping. Token failures answer
UNAUTHENTICATED (UNAVAILABLE when the keys cannot be had) with the reason in the
`error-code` trailer: `invalid_token`, `token_expired`, `session_revoked`.

A handler's outage (its database or broker cannot be reached, services.kit.errors.dependency_outage)
is UNAVAILABLE with `database_unavailable` / `broker_unavailable` in the `error-code` trailer, not
INTERNAL: the caller maps it to `<service>_unavailable` and tries again (from_grpc_error).

The port is bound by services.kit.transport: mutual TLS (a client certificate from the
service CA required) when GRPC_TLS_* are set, plaintext otherwise.

Every call of a service's own methods (not health nor reflection) is counted by the same
interceptor, by full method name and status code, with its latency (services.kit.metrics:
`clinic_grpc_server_calls_total`, `clinic_grpc_server_call_duration_seconds`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Collection, Iterable
from concurrent import futures
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.kit import metrics, tracing
from services.kit.auth import AuthError, TokenVerifier, bearer_token, current_identity
from services.kit.errors import DomainError, dependency_outage
from services.kit.logs import accept_correlation_id, correlation_id_var
from services.kit.transport import FROM_ENVIRONMENT, GrpcTls, add_port

log = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


@dataclass(frozen=True)
class ServiceBinding:
    """One servicer and how to register it: `add` is the generated add_XServicer_to_server."""

    add: Callable
    servicer: object
    full_name: str


class _EdgeInterceptor(grpc.ServerInterceptor):
    def __init__(self, verifier: TokenVerifier, open_methods: Collection[str] = frozenset(), service: str = ""):
        self.verifier = verifier
        self.open_methods = frozenset(open_methods)
        self.service = service or metrics.service_name()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        if handler.unary_unary is None:
            # Only unary calls get the identity check; a streaming method must not slip past it.
            return grpc.unary_unary_rpc_method_handler(_unimplemented_streaming)
        inner = handler.unary_unary
        decode = handler.request_deserializer
        needs_token = method not in self.open_methods

        def guarded(raw: bytes, context: grpc.ServicerContext):
            metadata = dict(context.invocation_metadata())
            traced = None
            if tracing.enabled():  # the call's span, continuing the caller's traceparent
                attributes = {"rpc.system": "grpc", "rpc.method": method, "service.name": self.service}
                traced = tracing.start(method.lstrip("/"), "SERVER", carrier=metadata, attributes=attributes)
            incoming = (
                traced.trace_id if traced is not None else accept_correlation_id(metadata.get("x-correlation-id"))
            )
            correlation = correlation_id_var.set(incoming or uuid.uuid4().hex)
            identity_token = None
            try:
                if needs_token:
                    token = bearer_token(metadata.get("authorization"))
                    if token is None:
                        context.set_trailing_metadata((("error-code", "unauthenticated"),))
                        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
                    try:
                        identity = self.verifier.verify(token)
                    except AuthError as exc:
                        if exc.code == "auth_unavailable":
                            # The check could not be made: named after its database when that is why.
                            outage = dependency_outage(exc)
                            code = outage.code if outage is not None else exc.code
                            context.set_trailing_metadata((("error-code", code),))
                            context.abort(grpc.StatusCode.UNAVAILABLE, exc.message)
                        context.set_trailing_metadata((("error-code", exc.code),))
                        context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)
                    except Exception:
                        log.exception("token verification failed", extra={"grpc_method": method})
                        context.set_trailing_metadata((("error-code", "auth_unavailable"),))
                        context.abort(grpc.StatusCode.UNAVAILABLE, "the caller's token cannot be checked now")
                    identity_token = current_identity.set(identity)
                else:
                    identity_token = current_identity.set(None)  # open: the handler sees no caller
                try:
                    request = decode(raw) if decode else raw
                except (DecodeError, ValueError):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed protobuf request")
                try:
                    return inner(request, context)
                except DomainError as exc:
                    context.set_trailing_metadata((("error-code", exc.code),))
                    context.abort(exc.grpc_status, exc.message)
                except Exception as exc:
                    if context.code() is not None:  # an abort from the handler itself
                        raise
                    outage = dependency_outage(exc)
                    if outage is not None:
                        extra = {"grpc_method": method, "code": outage.code, "error_type": type(exc).__name__}
                        log.warning("dependency unavailable", extra=extra)
                        context.set_trailing_metadata((("error-code", outage.code),))
                        context.abort(outage.grpc_status, outage.message)
                    log.exception("unhandled error in gRPC handler", extra={"grpc_method": method})
                    context.abort(grpc.StatusCode.INTERNAL, "internal error")
            finally:
                if identity_token is not None:
                    current_identity.reset(identity_token)
                correlation_id_var.reset(correlation)
                if traced is not None:
                    code = context.code()
                    failed = code is not None and code != grpc.StatusCode.OK
                    traced.finish(
                        error=code.name if failed else None,
                        attributes={"rpc.grpc.status_code": code.value[0] if code is not None else 0},
                    )

        return grpc.unary_unary_rpc_method_handler(
            _measured(guarded, self.service, method),
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )


def _measured(call: Callable, service: str, method: str) -> Callable:
    """`call`, counted with its status code (OK unless the context says otherwise; an exception
    that set none is UNKNOWN, as grpcio answers it) and timed."""

    def measured(raw: bytes, context: grpc.ServicerContext):
        started = time.perf_counter()
        unset = grpc.StatusCode.UNKNOWN
        try:
            response = call(raw, context)
            unset = grpc.StatusCode.OK
            return response
        finally:
            code = context.code() or unset
            metrics.observe_grpc(service, method, code.name, time.perf_counter() - started)

    return measured


def _unimplemented_streaming(_request, context: grpc.ServicerContext):
    context.abort(grpc.StatusCode.UNIMPLEMENTED, "streaming methods are not served")


class GrpcServer:
    def __init__(
        self,
        bindings: Iterable[ServiceBinding],
        verifier: TokenVerifier,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_workers: int = 16,
        open_methods: Iterable[str] = (),
        tls: GrpcTls | None | object = FROM_ENVIRONMENT,
        service: str = "",
    ):
        self.bindings = list(bindings)
        open_methods = frozenset(open_methods)
        for method in open_methods:
            if not method.startswith("/") or method.count("/") != 2:
                raise ValueError(f"open method {method!r} is not a full method name (/package.Service/Method)")
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
            interceptors=[_EdgeInterceptor(verifier, open_methods, service)],
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4 * 1024 * 1024)],
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        for binding in self.bindings:
            binding.add(binding.servicer, self.server)
            names.append(binding.full_name)
        reflection.enable_server_reflection(names, self.server)
        self.port, self.secure = add_port(self.server, f"{host}:{port}", tls=tls)
        if self.port == 0:
            raise RuntimeError(f"cannot bind gRPC port {host}:{port}")

    def start(self) -> None:
        self.server.start()
        self._set_all(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "gRPC server listening (mTLS)" if self.secure else "gRPC server listening (plaintext)",
            extra={"port": self.port},
        )

    def _set_all(self, status) -> None:
        self.health.set("", status)
        for binding in self.bindings:
            self.health.set(binding.full_name, status)

    def stop(self, grace_s: float = 5.0) -> None:
        """Report NOT_SERVING, refuse new calls and let in-flight ones finish within the grace period."""
        self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace_s).wait()
