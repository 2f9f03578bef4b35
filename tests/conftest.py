from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from pagefrag import FragDestructor


class Receiver:
    """A thread that reads a socket to EOF (stream) or until told (datagrams)."""

    def __init__(self, sock: socket.socket, *, stream: bool = True, paused: bool = False) -> None:
        self.sock = sock
        self.stream = stream
        self.data = bytearray()
        self.datagrams: list[bytes] = []
        self.go = threading.Event()
        if not paused:
            self.go.set()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.go.wait(60)
            self.sock.settimeout(30)
            while True:
                chunk = self.sock.recv(1 << 20)
                if self.stream:
                    if not chunk:
                        return
                    self.data += chunk
                else:
                    self.datagrams.append(chunk)
        except (TimeoutError, OSError) as exc:
            if self.stream:
                self.error = exc

    def join(self, timeout: float = 30) -> bytes:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "receiver did not finish"
        return bytes(self.data)


class Fired:
    """Destructors that record when they fire, and how often."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.lock = threading.Lock()

    def make(self, key: int, then: Callable[[], None] | None = None) -> FragDestructor:
        def destroy(_: object) -> None:
            with self.lock:
                self.counts[key] = self.counts.get(key, 0) + 1
            if then is not None:
                then()

        return FragDestructor(destroy, key)

    def once_each(self, keys: range | list[int]) -> bool:
        return all(self.counts.get(k) == 1 for k in keys) and set(self.counts) == set(keys)


@pytest.fixture
def fired() -> Fired:
    return Fired()


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    srv = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(srv.getsockname())
    server, _ = srv.accept()
    srv.close()
    yield client, server
    for s in (client, server):
        s.close()
