"""Waiting in tests: on an observable condition, never for a fixed time, and for threads that must
finish and whose errors must fail the test. Shared by every suite (unit, integration, e2e, browser).

Playwright's sync API runs route and event callbacks only while one of its own calls runs; a page
test waits with Playwright (expect(...), page.expect_request/expect_response, page.wait_for_function),
not with wait_until, whenever what it waits for is a callback of the page.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, message: str = "") -> T:
    """Poll `condition` until it returns something truthy, and return that; fail the test after `timeout` s
    (naming `message` and the last value seen)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{message or 'condition'} not met within {timeout}s (last: {result!r})")
        time.sleep(interval)


class Worker:
    """A thread whose outcome the test collects: `finish()` fails the test if the thread has not ended
    within its timeout, and raises what the thread raised."""

    def __init__(self, target: Callable[..., Any], *args: Any, name: str | None = None):
        self.name = name or getattr(target, "__name__", "worker")
        self.result: Any = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = target(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the test by finish()
                self.error = exc

        self.thread = threading.Thread(target=run, name=self.name, daemon=True)

    def start(self) -> Worker:
        self.thread.start()
        return self

    def finish(self, timeout: float = 10.0) -> Any:
        self.thread.join(timeout)
        if self.thread.is_alive():
            pytest.fail(f"thread {self.name!r} still running after {timeout}s")
        if self.error is not None:
            raise self.error
        return self.result


def finish_all(workers: list[Worker], timeout: float = 30.0) -> list[Any]:
    """Every worker's result, in order, once all have ended; fails naming each one still running or failed."""
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.thread.join(max(0.0, deadline - time.monotonic()))
    running = [w.name for w in workers if w.thread.is_alive()]
    failed = [f"{w.name}: {w.error!r}" for w in workers if w.error is not None]
    if running or failed:
        pytest.fail(f"threads still running after {timeout}s: {running}; threads that raised: {failed}")
    return [w.result for w in workers]


def together(*calls: Callable[[], T], timeout: float = 30.0) -> list[T]:
    """Run each call in a thread of its own, all released at once (a barrier), and return their results
    in order; fails if any raised or had not finished within `timeout` s."""
    barrier = threading.Barrier(len(calls))

    def released(call: Callable[[], T]) -> T:
        barrier.wait(timeout)
        return call()

    workers = [Worker(released, call, name=f"together-{n}").start() for n, call in enumerate(calls)]
    return finish_all(workers, timeout)


@contextlib.contextmanager
def background(run: Callable[..., Any], *args: Any, timeout: float = 10.0) -> Iterator[threading.Event]:
    """`run(stop, *args)` in a thread for the length of the block (a worker loop that ends once `stop` is
    set). On leaving the block `stop` is set; the thread must then end within `timeout` s without raising."""
    stop = threading.Event()
    worker = Worker(run, stop, *args, name=getattr(run, "__name__", "background")).start()
    try:
        yield stop
    finally:
        stop.set()
        worker.finish(timeout)
