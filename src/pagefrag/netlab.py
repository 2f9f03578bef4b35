"""Test hosts on this machine: two network namespaces joined by veth (root only).

Used by the tests, the benchmarks and ``pagefrag demo --netns``.

Addresses come from 198.18.0.0/15 (the benchmarking range) and live only inside the
namespaces; nothing is routed from the root namespace. Everything is deleted on exit,
also when the test fails. Sockets are created *inside* a namespace by switching the
calling thread into it for the ``socket()`` call (``setns``); a socket stays in the
namespace it was created in.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from types import TracebackType

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_ids = itertools.count()

SENDER_IP = "198.18.0.1"
RECEIVER_IP = "198.18.0.2"
BLACKHOLE_IP = "198.18.0.3"  # a static neighbour whose MAC nobody owns: frames are discarded


def missing_tools() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (tests/run installs it)"
    return None


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def run(*args: str, check: bool = True) -> str:
    """Run a command; its stdout, or ``RuntimeError`` with its stderr."""
    out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def _remove_stale() -> None:
    """Delete namespaces left by a lab whose process was killed (its pid is in the name)."""
    for line in run("ip", "netns", "list", check=False).splitlines():
        m = re.match(r"pf[sr](\d+)x\d+\b", line)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            run("ip", "netns", "del", line.split()[0], check=False)


class NetLab:
    """Namespaces ``sender`` and ``receiver`` joined by a veth pair."""

    def __init__(self) -> None:
        n = f"{os.getpid()}x{next(_ids)}"  # the pid lets a later lab remove stale ones
        self.sender = f"pfs{n}"
        self.receiver = f"pfr{n}"
        self.sender_if = f"pfa{n}"
        self.receiver_if = f"pfb{n}"

    def __enter__(self) -> NetLab:
        _remove_stale()
        try:
            self._build()
        except BaseException:
            self._destroy()
            raise
        return self

    def _build(self) -> None:
        run("ip", "netns", "add", self.sender)
        run("ip", "netns", "add", self.receiver)
        run(
            "ip",
            "link",
            "add",
            self.sender_if,
            "netns",
            self.sender,
            "type",
            "veth",
            "peer",
            "name",
            self.receiver_if,
            "netns",
            self.receiver,
        )
        for ns, dev, ip4 in (
            (self.sender, self.sender_if, SENDER_IP),
            (self.receiver, self.receiver_if, RECEIVER_IP),
        ):
            self.ns(ns, "ip", "link", "set", "lo", "up")
            self.ns(ns, "ip", "addr", "add", f"{ip4}/24", "dev", dev)
            self.ns(ns, "ip", "link", "set", dev, "up")

    def _destroy(self) -> None:
        for ns in (self.sender, self.receiver):
            run("ip", "netns", "del", ns, check=False)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._destroy()

    def ns(self, ns: str, *cmd: str, check: bool = True) -> str:
        return run("ip", "netns", "exec", ns, *cmd, check=check)

    @contextlib.contextmanager
    def inside(self, ns: str) -> Iterator[None]:
        """Run the body with this thread in namespace ``ns``."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            _setns(f"/run/netns/{ns}")
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "could not return to the home namespace")
            os.close(home)

    def open_socket(
        self, ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM
    ) -> socket.socket:
        with self.inside(ns):
            return socket.socket(family, type)

    def tcp_pair(self) -> tuple[socket.socket, socket.socket]:
        """A connected (sender, receiver) TCP pair across the veth."""
        listener = self.open_socket(self.receiver)
        listener.bind((RECEIVER_IP, 0))
        listener.listen(1)
        client = self.open_socket(self.sender)
        client.settimeout(10)
        client.connect(listener.getsockname()[:2])
        client.settimeout(None)
        server, _ = listener.accept()
        listener.close()
        return client, server

    def add_loss(self, percent: int) -> None:
        """Drop ``percent`` % of the frames arriving at the receiver (nftables, prerouting)."""
        rules = f"""
table inet pagefrag_loss {{
  chain pre {{
    type filter hook prerouting priority -300;
    iifname "{self.receiver_if}" numgen random mod 100 < {percent} counter drop
  }}
}}
"""
        subprocess.run(
            ["ip", "netns", "exec", self.receiver, "nft", "-f", "-"],
            input=rules,
            text=True,
            check=True,
            capture_output=True,
            timeout=30,
        )

    def blackhole_neighbour(self) -> str:
        """A neighbour of the sender whose frames the receiver's veth discards (the MAC
        is nobody's): UDP towards it is transmitted for real, never delivered locally."""
        self.ns(
            self.sender,
            "ip",
            "neigh",
            "replace",
            BLACKHOLE_IP,
            "lladdr",
            "02:00:5e:00:53:99",
            "dev",
            self.sender_if,
            "nud",
            "permanent",
        )
        return BLACKHOLE_IP

    def sysctl(self, ns: str, key: str, value: int | str) -> None:
        self.ns(ns, "sysctl", "-q", "-w", f"{key}={value}")
