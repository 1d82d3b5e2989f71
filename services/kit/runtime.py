"""Process lifecycle: start a service's servers and workers, drain them on SIGTERM, in stages.

Everything a process runs or holds belongs to one `Stage`; draining finishes each stage before
the next begins, so nothing is closed while something still uses it:

    INTAKE   HTTP and gRPC servers, listeners and consumers: stop taking new work
    WORKERS  background work (it may still stage outbox events while it finishes)
    RELAY    the outbox relay: publishes what the stages above left staged, then stops
    CLIENTS  connections every stage above uses (other services' clients, service tokens, Mongo)

services.kit.bootstrap puts each part of a service in its stage; this module only keeps the order.
"""

from __future__ import annotations

import enum
import logging
import resource
import signal
import sys
import threading
from collections.abc import Callable

import waitress
from flask import Flask
from pymongo.errors import PyMongoError

from services.kit.events import failure_summary
from services.kit.grpc_server import GrpcServer
from services.kit.logs import configure_logging
from services.kit.settings import SettingsError

log = logging.getLogger(__name__)


class Stage(enum.IntEnum):
    """When a part of the process stops; lower stages stop first."""

    INTAKE = 0
    WORKERS = 1
    RELAY = 2
    CLIENTS = 3


class ServiceProcess:
    """Owns the servers, background workers and clients of one service process."""

    def __init__(self, name: str):
        self.name = name
        # Set when the process starts to stop (signal, failed worker, stop()); the INTAKE stage's event.
        self.stop_event = threading.Event()
        self._events = {stage: threading.Event() for stage in Stage}
        self._events[Stage.INTAKE] = self.stop_event
        self._stoppers: dict[Stage, list[tuple[str, Callable[[], None]]]] = {stage: [] for stage in Stage}
        self._threads: dict[Stage, list[threading.Thread]] = {stage: [] for stage in Stage}

    def serve_http(self, app: Flask, host: str, port: int, threads: int = 8) -> int:
        server = waitress.create_server(
            app,
            host=host,
            port=port,
            threads=threads,
            ident="",
            channel_timeout=60,
            connection_limit=1000,
            # poll(), not select(): a process holding many sockets (web's event streams) has descriptors
            # above 1023, which select() cannot watch.
            asyncore_use_poll=True,
        )
        bound = server.effective_port
        thread = threading.Thread(target=server.run, name=f"{self.name}-http", daemon=True)
        thread.start()
        self._stoppers[Stage.INTAKE].append(("http", server.close))
        log.info("HTTP server listening", extra={"port": bound})
        return bound

    def serve_grpc(self, server: GrpcServer) -> int:
        server.start()
        self._stoppers[Stage.INTAKE].append(("grpc", lambda: server.stop(5.0)))
        return server.port

    def background(self, name: str, target: Callable[[threading.Event], None], stage: Stage = Stage.WORKERS) -> None:
        """Run `target(event)` in a thread; `event` is set when `stage` drains, and `target` must
        return soon after. A worker that fails stops the whole process."""

        def guarded():
            try:
                target(self._events[stage])
            except Exception:
                log.exception("background worker failed", extra={"route": name})
                self.stop_event.set()

        thread = threading.Thread(target=guarded, name=f"{self.name}-{name}", daemon=True)
        thread.start()
        self._threads[stage].append(thread)

    def on_stop(
        self, name: str, stop: Callable[[], None], *, after_workers: bool = False, stage: Stage | None = None
    ) -> None:
        """Call `stop` when `stage` drains (before its workers are joined); stoppers of one stage run
        in reverse order of registration. Without a stage: INTAKE, or (`after_workers`) CLIENTS."""
        if stage is None:
            stage = Stage.CLIENTS if after_workers else Stage.INTAKE
        self._stoppers[stage].append((name, stop))

    def wait(self) -> None:
        """Block until SIGTERM/SIGINT (or a failed worker), then drain stage by stage."""

        def _signal(signum, _frame):
            log.info("stopping on signal", extra={"code": signal.Signals(signum).name})
            self.stop_event.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        while not self.stop_event.wait(0.5):
            pass
        self._drain()

    def stop(self) -> None:
        """Stop without a signal (tests, embedding): set the stop event and drain as `wait` does."""
        self.stop_event.set()
        self._drain()

    def _drain(self) -> None:
        for stage in Stage:
            stoppers, self._stoppers[stage] = self._stoppers[stage], []
            self._run_stoppers(stoppers)
            self._events[stage].set()
            threads, self._threads[stage] = self._threads[stage], []
            for thread in threads:
                thread.join(timeout=10)
        log.info("stopped")

    @staticmethod
    def _run_stoppers(stoppers: list[tuple[str, Callable[[], None]]]) -> None:
        for name, stop in reversed(stoppers):
            try:
                stop()
            except Exception:
                log.exception("error while stopping", extra={"route": name})


def every(
    stop: threading.Event,
    interval_s: float,
    run_pass: Callable[[], object],
    what: str,
    errors: tuple[type[BaseException], ...] = (PyMongoError,),
) -> None:
    """Run `run_pass` every `interval_s` until `stop` is set. A pass that fails with one of `errors`
    (an outage, a failover, a busy record) is logged without its message and tried again next
    time; a background worker never dies of it."""
    while not stop.wait(interval_s):
        try:
            run_pass()
        except errors as exc:
            log.warning("%s pass failed (%s)", what, failure_summary(exc), extra={"error_type": type(exc).__name__})


def simulator_main(
    name: str, load: Callable[[], object], serve: Callable[[object, ServiceProcess], int], ready: str
) -> int:
    """The process of a development simulator (eRx vendor, fax provider, partner HISP): logging, its
    settings (printed and exit code 2 when invalid), then `serve(settings, process)` starts what it
    runs and answers the HTTP port it bound; `ready` is logged with that port; until SIGTERM/SIGINT."""
    configure_logging(name)
    try:
        settings = load()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return exc.code
    process = ServiceProcess(name)
    port = serve(settings, process)
    log.info(ready, extra={"port": port})
    process.wait()
    return 0


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit: a process holding thousands
    of open event streams (web's stream server, the gateway in front of it: two sockets each) needs
    more than the usual soft limit of 1,024. Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65_536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft
