"""Process lifecycle: start a service's servers and workers, drain them on SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

import waitress
from flask import Flask
from pymongo.errors import PyMongoError

from services.kit.events import failure_summary
from services.kit.grpc_server import GrpcServer

log = logging.getLogger(__name__)


class ServiceProcess:
    """Owns the servers and background workers of one service process."""

    def __init__(self, name: str):
        self.name = name
        self.stop_event = threading.Event()
        self._stoppers: list[tuple[str, Callable[[], None]]] = []
        self._final_stoppers: list[tuple[str, Callable[[], None]]] = []
        self._threads: list[threading.Thread] = []

    def serve_http(self, app: Flask, host: str, port: int, threads: int = 8) -> int:
        server = waitress.create_server(
            app, host=host, port=port, threads=threads, ident="", channel_timeout=60, connection_limit=1000
        )
        bound = server.effective_port
        thread = threading.Thread(target=server.run, name=f"{self.name}-http", daemon=True)
        thread.start()
        self._stoppers.append(("http", server.close))
        log.info("HTTP server listening", extra={"port": bound})
        return bound

    def serve_grpc(self, server: GrpcServer) -> int:
        server.start()
        self._stoppers.append(("grpc", lambda: server.stop(5.0)))
        return server.port

    def background(self, name: str, target: Callable[[threading.Event], None]) -> None:
        """Run `target(stop_event)` in a thread; it must return soon after stop_event is set."""

        def guarded():
            try:
                target(self.stop_event)
            except Exception:
                log.exception("background worker failed", extra={"route": name})
                self.stop_event.set()

        thread = threading.Thread(target=guarded, name=f"{self.name}-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def on_stop(self, name: str, stop: Callable[[], None], *, after_workers: bool = False) -> None:
        """Call `stop` while draining: with the servers, or (`after_workers`) once the background
        workers have returned, for what they still use (the database client)."""
        (self._final_stoppers if after_workers else self._stoppers).append((name, stop))

    def wait(self) -> None:
        """Block until SIGTERM/SIGINT (or a failed worker), then drain everything in reverse order."""

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
        stoppers, self._stoppers = self._stoppers, []
        self._run_stoppers(stoppers)
        for thread in self._threads:
            thread.join(timeout=10)
        final, self._final_stoppers = self._final_stoppers, []
        self._run_stoppers(final)
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
