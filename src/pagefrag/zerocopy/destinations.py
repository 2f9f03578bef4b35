"""What ``auto`` knows about a peer before the first send: local delivery, and what
earlier sockets to the same destination learned.

Theory of operation. A socket in ``auto`` mode looks its peer up once, when it is set up
(:func:`start_policy`, called by :class:`~pagefrag.zerocopy.ZeroCopySocket`):

1. A loopback peer (127.0.0.0/8, ``::1``) starts in ``COPYING``, in every namespace;
   there is nothing to learn or share about it.
2. Any other peer is keyed ``(netns, family, address)``: the inode of the socket's
   network namespace (the same address may be local in one namespace and remote in
   another), the address family and the peer's packed address (an IPv4-mapped IPv6
   address is keyed as the IPv4 address it maps).
3. If :data:`DESTINATIONS` (a bounded LRU shared by every socket of the process, any
   thread) holds what an earlier socket learned, the policy starts there: ``COPYING``
   with that destination's probe clock (so probes keep their schedule across short
   connections: the one socket set up after a probe fell due claims it), or
   ``ZEROCOPY``.
4. Otherwise, a destination delivered locally starts in ``COPYING``: a peer address
   equal to the socket's own address (the kernel picks a local destination as its own
   source), or one of the addresses of the namespace (a netlink ``RTM_GETADDR`` dump,
   cached per namespace for :data:`ADDRESS_TTL` seconds). The kernel copies every such
   send at delivery (``skb_orphan_frags_rx``), so ``MSG_ZEROCOPY`` there only costs.

Afterwards the policy reports each state change (never a send) and the cache records
it: ``COPYING``/``PROBING`` say "copies" with the probe clock, ``ZEROCOPY`` says "really
zero-copy". Explicit ``always``/``never`` neither read nor write the cache.

Limits: the namespace of a socket is read with ``ioctl(SIOCGSKNS)``, which needs
``CAP_NET_ADMIN``; without it the calling thread's namespace is taken (right unless
the socket was created in another namespace). The address table can be read only from
inside the socket's namespace; from another, only loopback and "peer is my own
address" are recognised. Addresses made local by a ``local`` route without being
configured (AnyIP) are not recognised: the copied completions teach ``auto`` as before.
A namespace inode may be reused after its namespace is gone; a stale entry heals at
the next probe (and an address table within ``ADDRESS_TTL``: whoever makes namespaces,
as ``pagefrag.testing.netlab`` does, calls :func:`forget_namespace`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import threading
import time
from collections import OrderedDict
from typing import Final

from .policy import State, ZeroCopyPolicy

__all__ = [
    "ADDRESS_TTL",
    "DESTINATIONS",
    "DestinationCache",
    "destination_key",
    "is_local",
    "local_addresses",
    "start_policy",
]

ADDRESS_TTL: Final = 1.0
"""Seconds a namespace's address table is reused before it is read again."""

SIOCGSKNS: Final = 0x894C  # linux/sockios.h: an fd of the socket's network namespace
_RTM_NEWADDR: Final = 20
_RTM_GETADDR: Final = 22
_NLM_F_REQUEST: Final = 0x1
_NLM_F_DUMP: Final = 0x300
_NLMSG_ERROR: Final = 2
_NLMSG_DONE: Final = 3
_IFA_ADDRESS: Final = 1
_IFA_LOCAL: Final = 2
_NLMSGHDR: Final = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFADDRMSG: Final = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTATTR: Final = struct.Struct("=HH")  # len, type
_V4MAPPED: Final = bytes(10) + b"\xff\xff"
_LOOPBACK6: Final = bytes(15) + b"\x01"

Key = tuple[int, int, bytes]


def _thread_netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


_sksns_allowed = True  # SIOCGSKNS needs CAP_NET_ADMIN: after one refusal, not tried again


def _socket_netns(sock: socket.socket) -> tuple[int, bool]:
    """(inode of the socket's namespace, whether that was read from the socket itself
    rather than taken from the calling thread)."""
    global _sksns_allowed
    if _sksns_allowed:
        try:
            fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                _sksns_allowed = False  # no capability, or a kernel without it
        else:
            try:
                return os.fstat(fd).st_ino, True
            finally:
                os.close(fd)
    return _thread_netns(), False


def _addresses(sock: socket.socket) -> tuple[int, bytes, bytes]:
    """(family, packed peer address, packed own address); IPv4-mapped IPv6 as IPv4."""
    family = sock.family
    peer = socket.inet_pton(family, sock.getpeername()[0])
    own = socket.inet_pton(family, sock.getsockname()[0])
    if family == socket.AF_INET6 and peer[:12] == _V4MAPPED:
        family, peer = socket.AF_INET, peer[12:]
        if own[:12] == _V4MAPPED:
            own = own[12:]
    return int(family), peer, own


def _loopback(family: int, peer: bytes) -> bool:
    return peer[0] == 127 if family == socket.AF_INET else peer == _LOOPBACK6


def destination_key(sock: socket.socket) -> Key:
    """The cache key ``(netns, family, packed peer address)`` of a connected IPv4/IPv6
    socket (an IPv4-mapped peer is keyed as IPv4). Kernel: ``getpeername``,
    ``ioctl(SIOCGSKNS)``.

    Refs: none."""
    family, peer, _ = _addresses(sock)
    return _socket_netns(sock)[0], family, peer


def _dump_addresses() -> frozenset[tuple[int, bytes]]:
    """Every address configured in the calling thread's namespace: a netlink
    ``RTM_GETADDR`` dump. Bounded: a 2 s timeout per read, at most 10 000 reads."""
    found: set[tuple[int, bytes]] = set()
    if not hasattr(socket, "AF_NETLINK"):
        raise OSError(errno.EAFNOSUPPORT, "no netlink here")
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        nl.settimeout(2.0)
        nl.bind((0, 0))
        body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        nl.send(
            _NLMSGHDR.pack(
                _NLMSGHDR.size + len(body), _RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
            )
            + body
        )
        for _ in range(10_000):
            data = nl.recv(1 << 16)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    raise OSError("netlink: malformed message")
                if kind == _NLMSG_DONE:
                    return frozenset(found)
                if kind == _NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                    raise OSError(-err, "netlink RTM_GETADDR refused")
                if kind == _RTM_NEWADDR:
                    _parse_address(data, offset + _NLMSGHDR.size, offset + length, found)
                offset += (length + 3) & ~3
    raise OSError("netlink: the address dump did not end")


def _parse_address(data: bytes, start: int, end: int, found: set[tuple[int, bytes]]) -> None:
    family = data[start]
    pos = start + _IFADDRMSG.size
    while pos + _RTATTR.size <= end:
        alen, atype = _RTATTR.unpack_from(data, pos)
        if alen < _RTATTR.size:
            return
        # IPv4: IFA_LOCAL is the interface's own address (IFA_ADDRESS is the far end
        # of a point-to-point link, not ours). IPv6 has only IFA_ADDRESS, its own.
        if atype == _IFA_LOCAL or (atype == _IFA_ADDRESS and family == socket.AF_INET6):
            found.add((family, bytes(data[pos + _RTATTR.size : pos + alen])))
        pos += (alen + 3) & ~3


_tables: dict[int, tuple[float, frozenset[tuple[int, bytes]]]] = {}
_tables_lock = threading.Lock()
_MAX_TABLES: Final = 64


def local_addresses(netns: int | None = None) -> frozenset[tuple[int, bytes]]:
    """``{(family, packed address)}`` configured in the calling thread's network
    namespace (whose inode is ``netns``, read when None), reused for
    :data:`ADDRESS_TTL` seconds. Kernel: ``RTM_GETADDR`` dump over ``NETLINK_ROUTE``.

    Refs: none."""
    if netns is None:
        netns = _thread_netns()
    now = time.monotonic()
    with _tables_lock:
        cached = _tables.get(netns)
    if cached is not None and now - cached[0] < ADDRESS_TTL:
        return cached[1]
    table = _dump_addresses()  # outside the lock: other namespaces need not wait
    with _tables_lock:
        if len(_tables) >= _MAX_TABLES:
            _tables.pop(next(iter(_tables)))
        _tables[netns] = (now, table)
    return table


def forget_namespace(netns: int) -> None:
    """Drop the cached address table of namespace inode ``netns``: a namespace just
    made may carry the inode of one deleted less than :data:`ADDRESS_TTL` ago, whose
    table would otherwise be taken for its own.

    Refs: none."""
    with _tables_lock:
        _tables.pop(netns, None)


def is_local(sock: socket.socket) -> bool:
    """Whether the kernel delivers ``sock``'s traffic to its peer locally: loopback,
    the socket's own address, or an address of its namespace when that is the calling
    thread's (the table can be read only from inside); see the module docstring for
    what is not recognised. Kernel: local delivery copies (``skb_orphan_frags_rx``).

    Refs: none."""
    family, peer, own = _addresses(sock)
    netns, from_socket = _socket_netns(sock)
    return _is_local(family, peer, own, netns, from_socket)


def _is_local(family: int, peer: bytes, own: bytes, netns: int, from_socket: bool) -> bool:
    if _loopback(family, peer) or peer == own:
        return True
    try:
        if from_socket and netns != _thread_netns():
            return False  # another namespace's table cannot be read from this thread
        return (family, peer) in local_addresses(netns)
    except OSError:
        return False  # no /proc or no netlink (a sandbox): completions will teach auto


class DestinationCache:
    """What sockets learned about destinations, shared: a bounded LRU of
    ``key -> (copying, probe clock)``, safe from any thread, O(1) per call. No kernel
    counterpart (the kernel keeps no such memory per destination)."""

    def __init__(self, capacity: int = 4096) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool):
            raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[Key, tuple[bool, float]] = OrderedDict()
        self._lock = threading.Lock()

    def lookup(self, key: Key, now: float, probe_interval: float) -> tuple[bool, float] | None:
        """``(copying, probe clock)`` learned for ``key``, or None. When a copying
        destination's probe is due, the caller gets the old clock (its first long send
        probes) and the entry takes ``now``: later sockets wait for the next interval.

        Refs: none."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            copying, clock = entry
            if copying and now - clock >= probe_interval:
                self._entries[key] = (True, now)  # this caller claims the due probe
            return entry

    def record(self, key: Key, copying: bool, clock: float) -> None:
        """Remember what a socket learned (a state change), evicting the least
        recently used entry beyond :attr:`capacity`.

        Refs: none."""
        with self._lock:
            self._entries[key] = (copying, clock)
            self._entries.move_to_end(key)
            if len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def get(self, key: Key) -> tuple[bool, float] | None:
        """The entry for ``key`` without touching its recency or probe clock."""
        with self._lock:
            return self._entries.get(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries


DESTINATIONS: Final = DestinationCache()
"""The process-wide cache every :class:`~pagefrag.zerocopy.ZeroCopySocket` in ``auto``
reads at set-up and writes on its policy's state changes."""


def start_policy(
    policy: ZeroCopyPolicy,
    sock: socket.socket,
    now: float,
    cache: DestinationCache = DESTINATIONS,
) -> Key | None:
    """Start ``policy`` (``auto``, fresh) where ``sock``'s destination is known to be,
    and make it report its state changes to ``cache``. Returns the key, or None for a
    loopback peer (always copies: nothing to share) or one that could not be read (the
    policy then starts as before, in ``ZEROCOPY``).

    Refs: none."""
    try:
        family, peer, own = _addresses(sock)
    except OSError:
        return None
    if _loopback(family, peer):
        # Always delivered locally, in every namespace: nothing to learn or share.
        policy.known_copying(now)
        return None
    try:
        netns, from_socket = _socket_netns(sock)
    except OSError:  # no /proc: no namespace to key by, nothing shared
        if peer == own:
            policy.known_copying(now)
        return None
    key = (netns, family, peer)
    learned = cache.lookup(key, now, policy.probe_interval)
    if learned is not None:
        if learned[0]:
            policy.known_copying(learned[1])
    elif _is_local(family, peer, own, netns, from_socket):
        policy.known_copying(now)

    def learn(state: State, clock: float) -> None:
        cache.record(key, state is not State.ZEROCOPY, clock)

    policy.on_change = learn
    return key


def _after_fork_in_child() -> None:
    # A thread of the parent may have held a lock at the fork: the child's copy would
    # stay locked forever and its first new socket hang in set-up. Fresh locks (and no
    # tables, which belonged to the parent's moment).
    global _tables_lock
    _tables_lock = threading.Lock()
    _tables.clear()
    DESTINATIONS._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
