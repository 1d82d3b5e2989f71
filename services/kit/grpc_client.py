"""Outgoing gRPC: every call carries a deadline, the correlation id and the caller's identity.

The identity is `current_identity`: the user whose request is being handled, or, for work no
user started (event handlers, background jobs), a service identity set with
services.kit.service_identity.acting_as. A call with neither is refused before it leaves.
The channel is mTLS or plaintext as services.kit.transport decides (GRPC_TLS_*).

A dependency that cannot answer (UNAVAILABLE: down, or its own database is; DEADLINE_EXCEEDED)
is the caller's `<dependency>_unavailable`, 503 with Retry-After (services.kit.errors.from_grpc_error).
While it is down the channel tries to reconnect at most every MAX_RECONNECT_BACKOFF_MS, so calls
succeed again within seconds of its return, without a restart.
"""

from __future__ import annotations

import collections

import grpc

from services.kit import tracing
from services.kit.auth import current_identity
from services.kit.logs import correlation_id_var
from services.kit.transport import FROM_ENVIRONMENT, GrpcTls, open_channel

DEFAULT_DEADLINE_S = 3.0
MAX_RECONNECT_BACKOFF_MS = 2_000


class NoCallerIdentity(RuntimeError):
    """A service-to-service call was attempted with neither a user nor a service identity."""


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _OutgoingInterceptor(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, default_deadline_s: float):
        self.default_deadline_s = default_deadline_s

    def intercept_unary_unary(self, continuation, client_call_details, request):
        metadata = list(client_call_details.metadata or [])
        keys = {k for k, _ in metadata}
        if "authorization" not in keys:
            identity = current_identity.get()
            if identity is not None and identity.token:
                metadata.append(("authorization", f"Bearer {identity.token}"))
            else:
                raise NoCallerIdentity(
                    f"no caller identity for {client_call_details.method}; work that no user started runs "
                    "under a service identity (services.kit.service_identity.acting_as)"
                )
        correlation_id = correlation_id_var.get()
        if correlation_id and "x-correlation-id" not in keys:
            metadata.append(("x-correlation-id", correlation_id))
        timeout = client_call_details.timeout
        if timeout is None:
            timeout = self.default_deadline_s
        if tracing.enabled():
            return self._traced(continuation, client_call_details, request, metadata, timeout)
        details = _CallDetails(
            client_call_details.method,
            timeout,
            metadata,
            client_call_details.credentials,
            client_call_details.wait_for_ready,
            client_call_details.compression,
        )
        return continuation(details, request)

    def _traced(self, continuation, client_call_details, request, metadata: list, timeout: float):
        """The call inside a CLIENT span whose `traceparent` goes in the metadata."""
        method = client_call_details.method
        method = method.decode() if isinstance(method, bytes) else method
        traced = tracing.start(
            method.lstrip("/"), "CLIENT", activate=False, attributes={"rpc.system": "grpc", "rpc.method": method}
        )
        carrier: dict[str, str] = {}
        tracing.inject(carrier, traced)
        metadata = [(k, v) for k, v in metadata if k not in (tracing.TRACEPARENT, tracing.TRACESTATE)]
        metadata += list(carrier.items())
        details = _CallDetails(
            client_call_details.method,
            timeout,
            metadata,
            client_call_details.credentials,
            client_call_details.wait_for_ready,
            client_call_details.compression,
        )
        error = None
        try:
            outcome = continuation(details, request)
            code = outcome.code() if hasattr(outcome, "code") else None
            if code is not None and code != grpc.StatusCode.OK:
                error = code.name
            return outcome
        except Exception as exc:
            error = type(exc).__name__
            raise
        finally:
            if traced is not None:
                traced.finish(error=error)


def channel(
    target: str,
    default_deadline_s: float = DEFAULT_DEADLINE_S,
    *,
    tls: GrpcTls | None | object = FROM_ENVIRONMENT,
) -> grpc.Channel:
    raw = open_channel(
        target,
        options=[
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.enable_retries", 1),
            # A dependency back after an outage is reached within seconds (gRPC's default backoff
            # between reconnection attempts grows to two minutes).
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ],
        tls=tls,
    )
    return grpc.intercept_channel(raw, _OutgoingInterceptor(default_deadline_s))
