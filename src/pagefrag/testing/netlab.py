"""Test hosts on this machine: two network namespaces joined by veth (root only).

Used by the tests, the benchmarks and ``pagefrag demo --netns``.

Addresses come from 198.18.0.0/15 (the benchmarking range) and live only inside the
namespaces; nothing is routed from the root namespace. Everything is deleted on exit,
also when the test fails. Sockets are created *inside* a namespace by switching the
calling thread into it for the ``socket()`` call (``setns``); a socket stays in the
namespace it was created in.

Cleanup on signals: see :class:`NetLab`. Only ``SIGKILL`` (or a crash) can leave
namespaces behind; their names carry the owner's pid, and every new lab (and every lab's
exit) deletes those whose process is gone (:func:`remove_stale`).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from types import FrameType, TracebackType

from ..zerocopy.destinations import forget_namespace

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


_NAME = re.compile(r"pf[sr](\d+)x\d+\b")
_TERM_STATUS = 128 + signal.SIGTERM
_LOSS_TABLE = "pagefrag_loss"


def lab_namespaces(pid: int | None = None) -> list[str]:
    """The namespaces of labs that exist now (of process ``pid`` only, if given)."""
    out = []
    for line in run("ip", "netns", "list", check=False).splitlines():
        m = _NAME.match(line)
        if m and (pid is None or int(m.group(1)) == pid):
            out.append(line.split()[0])
    return out


def remove_stale() -> list[str]:
    """Delete namespaces left by a lab whose process is gone (its pid is in the name);
    the names deleted."""
    gone = []
    for ns in lab_namespaces():
        m = _NAME.match(ns)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            run("ip", "netns", "del", ns, check=False)
            gone.append(ns)
    return gone


def _loss_rule(iface: str, percent: int) -> str:
    if percent == 100:
        return f'iifname "{iface}" meta nfproto ipv4 counter drop'
    # Evenly spaced slots of a per-rule packet counter: exactly ``percent`` frames in
    # every 100 are dropped, none of the first 100 // percent - 1 (the handshake passes).
    # IPv4 only: the lab's addresses are IPv4, and IPv6 neighbour discovery on the link
    # would otherwise take slots at random moments.
    slots = ", ".join(str(100 * (k + 1) // percent - 1) for k in range(percent))
    return f'iifname "{iface}" meta nfproto ipv4 numgen inc mod 100 {{ {slots} }} counter drop'


# SIGTERM while a lab exists: a handler raising SystemExit, so with-blocks clean up.
# Shared by every lab of the process: installed by the first (main thread, default
# disposition only), removed by the last; while any lab is deleting its namespaces a
# SIGTERM is held back and raised afterwards.
_term_lock = threading.Lock()
_term_users = 0
_cleaning = 0
_term_pending = False


def _on_term(signum: int, frame: FrameType | None) -> None:
    global _term_pending
    if _cleaning:
        _term_pending = True
        return
    raise SystemExit(_TERM_STATUS)


def _hook_term() -> bool:
    """Install the SIGTERM handler (or count one more user); whether this lab counts."""
    global _term_users
    if threading.current_thread() is not threading.main_thread():
        return False  # only the main thread may set handlers
    with _term_lock:
        if _term_users:
            _term_users += 1
            return True
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return False  # the program chose its own handling
        signal.signal(signal.SIGTERM, _on_term)
        _term_users = 1
        return True


def _unhook_term() -> None:
    global _term_users
    with _term_lock:
        _term_users -= 1
        if _term_users == 0 and signal.getsignal(signal.SIGTERM) is _on_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what it was when installed


def _raise_pending_term() -> None:
    global _term_pending
    if _term_pending and not _cleaning:
        _term_pending = False
        if threading.current_thread() is threading.main_thread():
            raise SystemExit(_TERM_STATUS)
        os.kill(os.getpid(), signal.SIGTERM)  # deliver it again, to the main thread


class NetLab:
    """Namespaces ``sender`` and ``receiver`` joined by a veth pair; use it as a
    context manager: the namespaces exist inside the ``with`` block only.

    SIGTERM: while a lab entered in the main thread lives, and SIGTERM had its default
    disposition when the first such lab was entered, SIGTERM raises ``SystemExit(143)``
    in the main thread, so the ``with`` blocks unwind and delete their namespaces in any
    program using a lab (``kill``, a test runner's timeout); the default disposition
    comes back when the last of those labs ends. A SIGTERM that arrives while a lab is
    deleting its namespaces is held back and raised once they are gone. A handler the
    program installed is left alone (it must clean up itself); a lab entered in another
    thread installs nothing. ``SIGINT`` already raises ``KeyboardInterrupt``.
    :func:`sigterm_exits` gives a whole program run the same SIGTERM behaviour.
    """

    def __init__(self) -> None:
        n = f"{os.getpid()}x{next(_ids)}"  # the pid lets a later lab remove stale ones
        self.sender = f"pfs{n}"
        self.receiver = f"pfr{n}"
        self.sender_if = f"pfa{n}"
        self.receiver_if = f"pfb{n}"
        self._loss = 0
        self._dropped_before = 0  # drops counted by loss rules since replaced
        self._term_hooked = False

    def __enter__(self) -> NetLab:
        self._term_hooked = _hook_term()
        try:
            remove_stale()
            self._build()
        except BaseException:
            self._cleanup()
            raise
        return self

    def _cleanup(self) -> None:
        global _cleaning
        with _term_lock:
            _cleaning += 1  # a SIGTERM now waits until the namespaces are deleted
        try:
            if self._loss:
                with contextlib.suppress(Exception):
                    self._dropped_before, self._loss = self.dropped(), 0
            self._destroy()
        finally:
            with _term_lock:
                _cleaning -= 1
            if self._term_hooked:
                self._term_hooked = False
                _unhook_term()
        with contextlib.suppress(Exception):
            remove_stale()
        _raise_pending_term()

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
            # The kernel may give it the inode of a namespace just deleted (an earlier
            # lab's): that one's cached address table is not this one's.
            forget_namespace(os.stat(f"/run/netns/{ns}").st_ino)

    def _destroy(self) -> None:
        # Each namespace is deleted even when the other's deletion failed or timed out
        # (under load ``ip`` can be slow): one failure must not leave the other behind.
        errors: list[BaseException] = []
        for ns in (self.sender, self.receiver):
            for _attempt in range(2):
                try:
                    run("ip", "netns", "del", ns, check=False)
                    break
                except subprocess.TimeoutExpired as exc:
                    errors.append(exc)
        left = [ns for ns in lab_namespaces() if ns in (self.sender, self.receiver)]
        if left:
            raise RuntimeError(f"could not delete namespaces {left}: {errors}")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._cleanup()

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
        """Drop ``percent`` % of the IPv4 frames arriving at the receiver's veth
        (nftables, prerouting hook), deterministically: exactly ``percent`` of every 100
        frames, evenly spaced, the first after ``100 // percent - 1`` frames pass; 100
        drops every frame; 0 removes the loss. A frame is what reaches the hook: on veth
        a TCP GSO super-packet of up to 64 KB, so one drop costs TCP up to ~45 segments.
        A second call replaces the rule; :meth:`dropped` keeps counting across calls.
        ``TypeError`` for a non-integer, ``ValueError`` outside 0..100, before anything
        changes."""
        if not isinstance(percent, int) or isinstance(percent, bool):
            raise TypeError(f"percent must be an int, not {type(percent).__name__}")
        if not 0 <= percent <= 100:
            raise ValueError(f"percent must be between 0 and 100, not {percent}")
        self._dropped_before = self.dropped()
        script = f"table inet {_LOSS_TABLE} {{}}\ndelete table inet {_LOSS_TABLE}\n"
        if percent:
            script += f"""table inet {_LOSS_TABLE} {{
  chain pre {{
    type filter hook prerouting priority -300;
    {_loss_rule(self.receiver_if, percent)}
  }}
}}
"""
        out = subprocess.run(
            ["ip", "netns", "exec", self.receiver, "nft", "-f", "-"],
            input=script,
            text=True,
            capture_output=True,
            timeout=30,
        )
        if out.returncode != 0:
            raise RuntimeError(f"nft (loss {percent} %): {out.stderr.strip()}")
        self._loss = percent

    def dropped(self) -> int:
        """How many frames the loss rules of :meth:`add_loss` have dropped so far (the
        nftables counter); 0 without loss. Tests assert it is positive before trusting
        a run "with loss"."""
        if not self._loss:
            return self._dropped_before
        raw = self.ns(self.receiver, "nft", "-j", "list", "table", "inet", _LOSS_TABLE)
        packets = 0
        for item in json.loads(raw)["nftables"]:
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    packets += int(expr["counter"]["packets"])
        return self._dropped_before + packets

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


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """For the body, SIGTERM raises ``SystemExit(143)`` (as inside a lab): main thread
    and default disposition only, else nothing changes. A program that builds labs
    wraps its whole run in it so a SIGTERM outside a lab exits the same way."""
    hooked = _hook_term()
    try:
        yield
    finally:
        if hooked:
            _unhook_term()
