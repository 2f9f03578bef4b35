"""A TCP sink in its own process: accepts connections and discards what they send.

python benchmarks/_sink.py HOST   -> prints the port, serves until killed
"""

from __future__ import annotations

import socket
import sys
import threading


def drain(conn: socket.socket) -> None:
    buf = bytearray(4 << 20)
    with conn:
        while conn.recv_into(buf):
            pass


def main() -> None:
    family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    srv = socket.create_server((sys.argv[1], 0), family=family, backlog=64)
    print(srv.getsockname()[1], flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=drain, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
