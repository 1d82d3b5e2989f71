"""The MLLP listener over real sockets: concurrent connections, its limits, and draining on stop.
Messages are sent with python-hl7's MLLPClient and the ACKs parsed with python-hl7."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from hl7.client import MLLPClient

from services.notifications.hl7v2 import InboundMessage
from services.notifications.mllp import MessageTypes, MllpServer
from tests.e2e.lab_messages import oru
from tests.helpers import msa
from tests.waits import Worker, wait_until


class Listener:
    def __init__(self, server: MllpServer, received: list[str], stop: threading.Event, worker: Worker):
        self.server = server
        self.received = received
        self.stop = stop
        self.worker = worker
        self.thread = worker.thread

    def client(self) -> MLLPClient:
        return MLLPClient("127.0.0.1", self.server.port)


@contextmanager
def listening(handler=None, **limits) -> Iterator[Listener]:
    received: list[str] = []

    def record(message: InboundMessage) -> None:
        if handler is not None:
            handler(message)
        received.append(message.header.control_id)

    types = MessageTypes()
    types.register("ORU", "R01", record)
    options = {"max_message_bytes": 64 * 1024, "max_connections": 16, "idle_timeout_s": 30.0, **limits}
    server = MllpServer("127.0.0.1", 0, types.acknowledge, **options)
    stop = threading.Event()
    worker = Worker(server.run, stop, name="mllp-listener").start()
    try:
        yield Listener(server, received, stop, worker)
    finally:
        stop.set()
        worker.finish(15)  # the listener ended, without an error


def closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_concurrent_connections_are_each_answered_in_order():
    with listening() as listener:

        def one_connection(n: int) -> list[tuple[str, str]]:
            with listener.client() as client:
                return [msa(client.send_message(oru(control_id=f"C{n}-{i}")))[:2] for i in range(5)]

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one_connection, range(8)))
    assert answers == [[("AA", f"C{n}-{i}") for i in range(5)] for n in range(8)]
    assert sorted(listener.received) == sorted(f"C{n}-{i}" for n in range(8) for i in range(5))


def test_connections_beyond_the_limit_are_closed_and_served_again_once_one_ends():
    with listening(max_connections=2) as listener:
        first, second = listener.client(), listener.client()
        assert msa(first.send_message(oru(control_id="L1")))[0] == "AA"
        assert msa(second.send_message(oru(control_id="L2")))[0] == "AA"
        with listener.client() as third:
            assert closed_by_peer(third.socket)
        first.close()

        def served() -> bool:
            try:
                with listener.client() as fourth:
                    answer = fourth.send_message(oru(control_id="L4"))
            except OSError:
                return False
            return bool(answer) and msa(answer)[0] == "AA"  # b"": closed while the slot was still taken

        wait_until(served)
        second.close()


def test_an_oversize_message_is_rejected_and_its_connection_closed_others_keep_going():
    with listening(max_message_bytes=4096) as listener, listener.client() as other:
        with listener.client() as client:
            notes = [f"OBX|{i}|TX|1^Note^L||{'x' * 200}||||||F" for i in range(1, 40)]
            answer = client.send_message(oru(control_id="HUGE", observations=notes))
            assert msa(answer)[:2] == ("AR", "HUGE")  # read from the frame's head: the sender knows which
            assert closed_by_peer(client.socket)
        assert msa(other.send_message(oru(control_id="STILL")))[0] == "AA"
    assert listener.received == ["STILL"]


def test_a_stream_of_bytes_outside_any_frame_is_cut_off():
    with listening(max_message_bytes=2048) as listener, listener.client() as client:
        client.socket.sendall(b"GET / HTTP/1.1\r\n" * 300)
        assert closed_by_peer(client.socket)
    assert listener.received == []


def test_an_idle_connection_is_closed():
    with listening(idle_timeout_s=1.0) as listener, listener.client() as client:
        assert msa(client.send_message(oru(control_id="IDLE")))[0] == "AA"
        assert closed_by_peer(client.socket, timeout=10.0)


def test_stopping_lets_the_message_in_hand_finish_and_acknowledges_it():
    entered, release = threading.Event(), threading.Event()

    def slow(_message: InboundMessage) -> None:
        entered.set()
        assert release.wait(10)

    with listening(handler=slow) as listener:
        client = listener.client()
        sender = Worker(client.send_message, oru(control_id="DRAIN"), name="sender").start()
        assert entered.wait(10)
        listener.stop.set()  # what SIGTERM does

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", listener.server.port), timeout=1).close()
            except OSError:
                return True
            return False

        wait_until(refused)  # no new connections while the message in hand is finished
        assert listener.thread.is_alive()
        release.set()
        answer = sender.finish(10)  # the message in hand was answered
        listener.worker.finish(10)  # and then the listener ended, without an error
        client.close()
    assert msa(answer)[:2] == ("AA", "DRAIN")
    assert listener.received == ["DRAIN"]
