"""The few socket calls Python's ``socket`` module does not offer, and the constants it
does not define. Linux only; everything here is a thin wrapper."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import socket
import struct
from dataclasses import dataclass

from ..errors import ZeroCopyUnsupportedError

# Plain ints, not the socket module's IntFlag members: "|" on an enum is slow.
SO_ZEROCOPY: int = int(getattr(socket, "SO_ZEROCOPY", 60))
MSG_ZEROCOPY: int = int(getattr(socket, "MSG_ZEROCOPY", 0x4000000))
MSG_ERRQUEUE: int = int(getattr(socket, "MSG_ERRQUEUE", 0x2000))
MSG_DONTWAIT: int = int(getattr(socket, "MSG_DONTWAIT", 0x40))
IP_RECVERR: int = int(getattr(socket, "IP_RECVERR", 11))
IPV6_RECVERR: int = int(getattr(socket, "IPV6_RECVERR", 25))
SOL_IP: int = int(getattr(socket, "SOL_IP", 0))
SOL_IPV6: int = int(getattr(socket, "SOL_IPV6", 41))
RECVERR_CMSGS = frozenset({(SOL_IP, IP_RECVERR), (SOL_IPV6, IPV6_RECVERR)})
# One error-queue message: struct sock_extended_err (16) + the offender's sockaddr_in6 (28).
ERRQUEUE_ANCBUF = socket.CMSG_SPACE(16 + 28)


def _iov_max() -> int:
    try:
        value = os.sysconf("SC_IOV_MAX")
    except (ValueError, OSError):
        value = -1
    return value if value > 0 else 1024


IOV_MAX = _iov_max()
"""The most pieces one ``sendmsg`` may carry (``UIO_MAXIOV``); more fail with EMSGSIZE."""

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return _libc


_NOT_CONNECTED = (errno.ENOTCONN, errno.EINVAL)


def disconnect(sock: socket.socket) -> None:
    """``connect(fd, {AF_UNSPEC})``: for TCP the kernel's ``tcp_disconnect`` (an RST,
    every queue purged) while the descriptor stays open, so the zero-copy completions
    of the purged data can still be read. For UDP it dissolves the association.

    A socket with nothing to disconnect (``ENOTCONN``, ``EINVAL``: never connected, or
    disconnected already) is no error; any other ``OSError`` (``EBADF``: closed behind
    the caller's back) is raised."""
    addr = struct.pack("=H14x", socket.AF_UNSPEC)
    if _c().connect(sock.fileno(), ctypes.c_char_p(addr), len(addr)) != 0:
        err = ctypes.get_errno()
        if err not in _NOT_CONNECTED:
            raise OSError(err, os.strerror(err))


def check_connected_inet(sock: socket.socket) -> None:
    """``ValueError`` unless ``sock`` is an IPv4 or IPv6 TCP or UDP socket;
    ``OSError(ENOTCONN)`` unless it is connected."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"ZeroCopySocket needs an IPv4 or IPv6 socket, not {sock.family!r}")
    if sock.type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        raise ValueError(f"ZeroCopySocket needs a TCP or UDP socket, not {sock.type!r}")
    sock.getpeername()


def enable_zerocopy(sock: socket.socket) -> None:
    """``setsockopt(SO_ZEROCOPY, 1)``; :class:`ZeroCopyUnsupportedError` where the kernel
    or the socket refuses it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
    except OSError as exc:
        raise ZeroCopyUnsupportedError(
            exc.errno, f"SO_ZEROCOPY is not supported here: {exc.strerror}"
        ) from exc


def set_nodelay(sock: socket.socket) -> None:
    """``TCP_NODELAY``, as asyncio sets it on every TCP transport
    (``base_events._set_nodelay``): a small write goes out at once instead of waiting for
    the ACK of the previous one (Nagle + delayed ACK: ~40 ms per round trip)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def enable_recverr(sock: socket.socket) -> None:
    """``IP_RECVERR``/``IPV6_RECVERR``: a datagram socket's ICMP errors are queued on its
    error queue, in order with the zero-copy completions."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_RECVERR, 1)
    else:
        sock.setsockopt(SOL_IP, IP_RECVERR, 1)


def wait_writable(sock: socket.socket, timeout: float | None) -> bool:
    """``poll(POLLOUT)`` for at most ``timeout`` seconds (None: no bound); True if it
    reported ``POLLERR`` (a socket error, or error-queue messages to read)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    ms = -1 if timeout is None else int(timeout * 1000) + 1
    return any(ev & select.POLLERR for _, ev in poller.poll(ms))


@dataclass(frozen=True)
class TcpInfo:
    """The fields of ``struct tcp_info`` that pagefrag reports."""

    state: int
    retransmits: int
    unacked: int
    lost: int
    retrans: int
    total_retrans: int
    snd_cwnd: int
    rtt_us: int


_TCP_INFO = getattr(socket, "TCP_INFO", 11)


def tcp_info(sock: socket.socket) -> TcpInfo:
    """Read ``TCP_INFO`` (linux/tcp.h layout, stable since 2.6)."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 104)
    state, _ca, retransmits = raw[0], raw[1], raw[2]
    (unacked, _sacked, lost, retrans) = struct.unpack_from("=4I", raw, 24)
    rtt, _rttvar, _ssthresh, cwnd = struct.unpack_from("=4I", raw, 68)
    (total_retrans,) = struct.unpack_from("=I", raw, 100)
    return TcpInfo(state, retransmits, unacked, lost, retrans, total_retrans, cwnd, rtt)
