"""Session revocations reach every service at once.

Directory announces each session it ends early as `session.revoked.v1` (a
clinic.directory.v1.SessionRevoked, staged in the session document itself and published by its
outbox relay). Every other service that verifies access tokens runs this listener, which fills
the `RevokedSessions` its `TokenVerifier` consults:

- a bus Consumer on a queue of this process instance alone,
  `<service>.session-revocations.<instance id>`, bound to `session.revoked.v1`, so every replica
  hears every revocation. The queue (and its retry and parking queues) carries `x-expires`: the
  broker deletes it once the instance has been gone for `queue_expires_ms`;
- each time the consumer starts consuming (at start-up and after every reconnection), a
  bootstrap from directory's ListRevokedSessions with a platform-scope service token: a replica
  started after a revocation, or one whose queue lapsed during a long broker outage, still
  refuses the revoked tokens. Consuming first and then listing leaves no gap between the two.

Directory itself checks revocation against its own sessions store and runs no listener.
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid

import grpc

from clinic.directory.v1 import directory_pb2, directory_pb2_grpc
from services.kit import grpc_client
from services.kit.auth import ACCESS_TOKEN_TTL_S, RevokedSessions
from services.kit.bus import Consumer, Topology
from services.kit.events import Envelope, MalformedEvent, failure_summary, unpack
from services.kit.mongo import now_ms
from services.kit.runtime import ServiceProcess
from services.kit.service_identity import ServiceTokens, acting_as

__all__ = [
    "BOOTSTRAP_WINDOW_MS",
    "SESSION_REVOKED_EVENT",
    "RevocationListener",
    "start_revocation_listener",
]

log = logging.getLogger(__name__)

SESSION_REVOKED_EVENT = "session.revoked.v1"
# How far back a revocation can still matter: one access-token lifetime, plus a minute of skew.
BOOTSTRAP_WINDOW_MS = (ACCESS_TOKEN_TTL_S + 60) * 1000
LIST_PAGE_LIMIT = 5000  # directory's page size for ListRevokedSessions


def instance_id() -> str:
    """Host, pid and a random part: unique per process start, readable in `rabbitmqctl list_queues`."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:40] or "host"
    return f"{host}-{uuid.uuid4().hex[:8]}"


class RevocationListener:
    """The consumer and the bootstrap loop; `run(stop_event)` is the background worker."""

    def __init__(  # noqa: PLR0917 - the listener's seven collaborators, as start_revocation_listener takes them
        self,
        amqp_url: str,
        topology: Topology,
        service_name: str,
        revoked: RevokedSessions,
        service_tokens: ServiceTokens,
        directory_target: str,
        *,
        instance: str | None = None,
        queue_expires_ms: int = 10 * 60 * 1000,
        deadline_s: float = 5.0,
        retry_delay_s: tuple[float, float] = (0.5, 30.0),
    ):
        self.revoked = revoked
        self.service_tokens = service_tokens
        self.instance = instance or instance_id()
        self.consumer = Consumer(
            amqp_url,
            f"{service_name}.session-revocations.{self.instance}",
            [SESSION_REVOKED_EVENT],
            self.handle,
            topology=topology,
            prefetch=64,
            max_retries=3,
            retry_delay_ms=1_000,
            connection_name=f"{service_name}-session-revocations",
            queue_expires_ms=queue_expires_ms,
        )
        self._channel = grpc_client.channel(directory_target, default_deadline_s=deadline_s)
        self._stub = directory_pb2_grpc.DirectoryServiceStub(self._channel)
        self._retry_delay_s = retry_delay_s
        self.bootstrapped = threading.Event()
        self.bootstraps = 0  # completed bootstraps (one per consuming session)

    @property
    def queue(self) -> str:
        return self.consumer.queue

    def wait_ready(self, timeout: float) -> bool:
        """True once consuming and bootstrapped (a first ListRevokedSessions succeeded)."""
        return self.bootstrapped.wait(timeout)

    def handle(self, envelope: Envelope) -> None:
        event = unpack(envelope, directory_pb2.SessionRevoked)
        if not event.session_id:
            raise MalformedEvent("session.revoked.v1 without a session id")
        self._remember(event)

    def _remember(self, event: directory_pb2.SessionRevoked) -> None:
        expires = event.access_expires_at.ToMilliseconds()
        if expires <= 0:  # an older producer: assume the longest access-token lifetime
            expires = (event.revoked_at.ToMilliseconds() or now_ms()) + ACCESS_TOKEN_TTL_S * 1000
        self.revoked.revoke(event.session_id, expires)

    def bootstrap(self) -> int:
        """Load the recent revocations from directory; returns how many were listed."""
        since = now_ms() - BOOTSTRAP_WINDOW_MS
        listed = 0
        with acting_as(self.service_tokens.identity("")):
            while True:
                try:
                    reply = self._stub.ListRevokedSessions(directory_pb2.ListRevokedSessionsRequest(since_ms=since))
                except grpc.RpcError as exc:
                    if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                        self.service_tokens.forget("")  # e.g. directory's keys rotated: ask anew next time
                    raise
                for event in reply.sessions:
                    self._remember(event)
                listed += len(reply.sessions)
                if len(reply.sessions) < LIST_PAGE_LIMIT:
                    return listed
                last = reply.sessions[-1].revoked_at.ToMilliseconds()
                if last <= since:  # a whole page within one millisecond: nothing further to page by
                    return listed
                since = last

    def run(self, stop_event: threading.Event) -> None:
        thread = self.consumer.start()
        bootstrapped_session = 0
        failures = 0
        try:
            while not stop_event.is_set():
                session = self.consumer.sessions
                if self.consumer.consuming and session > bootstrapped_session:
                    try:
                        count = self.bootstrap()
                    except Exception as exc:  # directory or broker trouble: retry with backoff, never die
                        failures += 1
                        delay = min(self._retry_delay_s[1], self._retry_delay_s[0] * 2 ** min(failures - 1, 10))
                        log.warning(
                            "revocation bootstrap failed (%s); retrying",
                            failure_summary(exc),
                            extra={
                                "queue": self.queue,
                                "attempt": failures,
                                "delay_s": delay,
                                "error_type": type(exc).__name__,
                            },
                        )
                        stop_event.wait(delay)
                        continue
                    failures = 0
                    bootstrapped_session = session
                    self.bootstraps += 1
                    self.bootstrapped.set()
                    log.info("revocations bootstrapped", extra={"queue": self.queue, "count": count})
                stop_event.wait(0.1)
        finally:
            self.consumer.stop()
            thread.join(10)
            self._channel.close()


def start_revocation_listener(  # noqa: PLR0917 - every argument is required and distinct
    process: ServiceProcess,
    amqp_url: str,
    topology: Topology,
    service_name: str,
    revoked: RevokedSessions,
    service_tokens: ServiceTokens,
    directory_target: str,
    ready_within_s: float = 10.0,
    **options,
) -> RevocationListener:
    """Start the listener as one of `process`'s background workers and wait up to `ready_within_s`
    for it to consume and bootstrap, so revoked sessions are known before the service serves; past
    that it serves anyway (the listener keeps trying) and says so. Returns the listener."""
    listener = RevocationListener(
        amqp_url, topology, service_name, revoked, service_tokens, directory_target, **options
    )
    process.background("session-revocations", listener.run)
    if ready_within_s and not listener.wait_ready(ready_within_s):
        log.warning(
            "serving before the revoked sessions were loaded; the listener keeps trying",
            extra={"queue": listener.queue},
        )
    return listener
