"""Receivers in their own process: a TCP sink that accepts connections and discards what
they send, and a pyzmq PULL sink.

    python -m pagefrag.bench.sink [--cpu N] HOST        -> prints the TCP port, serves until killed
    python -m pagefrag.bench.sink [--cpu N] --zmq HOST  -> prints the zmq endpoint

``--cpu N`` pins the sink (all its threads) to core N before it starts serving, so the
receiver never competes with the sender for its core.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from typing import Any


def drain(conn: socket.socket) -> None:
    buf = bytearray(4 << 20)
    with conn:
        while conn.recv_into(buf):
            pass


def tcp_sink(host: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.create_server((host, 0), family=family, backlog=64)
    print(srv.getsockname()[1], flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=drain, args=(conn,), daemon=True).start()


def zmq_sink(host: str) -> None:
    import zmq

    pull: Any = zmq.Context.instance().socket(zmq.PULL)
    port = pull.bind_to_random_port(f"tcp://{host}")
    print(f"tcp://{host}:{port}", flush=True)
    while True:
        pull.recv(copy=False)


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--cpu"]:
        # Before any thread exists: every thread started later inherits it.
        os.sched_setaffinity(0, {int(args[1])})
        args = args[2:]
    if args[0] == "--zmq":
        zmq_sink(args[1])
    else:
        tcp_sink(args[0])


if __name__ == "__main__":
    main()
