"""Making the sockets of :mod:`.streams`: a client socket connected as
``loop.create_connection`` connects one, and the listening sockets ``loop.create_server``
binds, with the same arguments and the same checks (the model is CPython 3.11's
``asyncio/base_events.py``).

Rule: this module only makes and checks sockets (and the TLS arguments that go with
them); it knows nothing of transports, protocols or zero-copy. A socket it made and
could not finish is closed before the error leaves; a caller's socket (``sock=``) it
refuses is left as it was.

Theory of operation. A client: the host is resolved (``family``, ``proto``, ``flags``),
so is ``local_addr`` with the same family; the addresses are tried in order, or, with
``happy_eyeballs_delay``, raced with a new attempt started every that many seconds
(RFC 8305, ``asyncio.staggered.staggered_race``; the families interleaved, as asyncio).
Each attempt binds the local address of its family, if any, before it connects. A
server: every host of ``host`` (a string, a sequence of them, or None for every
interface) is resolved, the duplicates dropped, and one socket bound per address, with
``SO_REUSEADDR`` (by default on POSIX), ``SO_REUSEPORT`` if asked and ``IPV6_V6ONLY`` on
IPv6 sockets, so ``host=None`` gives an IPv4 socket and an IPv6 one side by side.
"""

from __future__ import annotations

import asyncio
import collections.abc
import functools
import itertools
import socket
from asyncio import staggered
from typing import Any

__all__ = [
    "check_ssl_socket",
    "check_tls_options",
    "connected_socket",
    "listening_sockets",
    "server_hostname_for",
    "socket_for",
]

AddrInfo = tuple[Any, ...]

try:
    import ssl as _ssl
except ImportError:  # pragma: no cover - Python built without OpenSSL
    _ssl = None  # type: ignore[assignment]


def check_ssl_socket(sock: object) -> None:
    """As asyncio: an ``ssl.SSLSocket`` is refused (TLS is the loop's to do)."""
    if _ssl is not None and isinstance(sock, _ssl.SSLSocket):
        raise TypeError("Socket cannot be of type SSLSocket")


def _numeric(host: Any, port: Any, family: int, proto: int) -> list[AddrInfo] | None:
    """A numeric address needs no resolver: its one addrinfo, as asyncio's
    ``_ipaddr_info`` gives (no executor thread: the first connection would pay for
    starting it, ~5 ms); None when ``getaddrinfo`` must decide."""
    if not isinstance(host, str) or proto not in (0, socket.IPPROTO_TCP):
        return None
    if port is None:
        port = 0
    elif isinstance(port, (bytes, str)) and port.isdigit():
        try:
            port = int(port)
        except ValueError:  # digits int() does not take ("²"): the resolver decides
            return None
    elif type(port) is not int:
        return None
    families = (socket.AF_INET, socket.AF_INET6) if family == socket.AF_UNSPEC else (family,)
    for af in families:
        if af not in (socket.AF_INET, socket.AF_INET6):
            return None
        try:
            socket.inet_pton(af, host)  # strict: "127.1" or "fe80::1%eth0" go to getaddrinfo
        except (OSError, UnicodeEncodeError):
            continue
        addr = (host, port) if af == socket.AF_INET else (host, port, 0, 0)
        return [(af, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", addr)]
    return None


async def _resolved(
    loop: asyncio.AbstractEventLoop,
    host: Any,
    port: Any,
    *,
    family: int,
    proto: int = 0,
    flags: int = 0,
) -> list[AddrInfo]:
    numeric = _numeric(host, port, family, proto)
    if numeric is not None:
        return numeric
    infos = await loop.getaddrinfo(
        host, port, family=family, type=socket.SOCK_STREAM, proto=proto, flags=flags
    )
    if not infos:
        raise OSError(f"getaddrinfo({host!r}) returned empty list")
    return list(infos)


def _interleaved(infos: list[AddrInfo], first_family_count: int) -> list[AddrInfo]:
    """The addresses by family in turn, the first family's first ``first_family_count``
    first (asyncio's ``_interleave_addrinfos``)."""
    by_family: dict[int, list[AddrInfo]] = {}
    for info in infos:
        by_family.setdefault(info[0], []).append(info)
    lists = list(by_family.values())
    out: list[AddrInfo] = []
    if first_family_count > 1:
        out.extend(lists[0][: first_family_count - 1])
        del lists[0][: first_family_count - 1]
    out.extend(a for a in itertools.chain(*itertools.zip_longest(*lists)) if a is not None)
    return out


async def _attempt(
    loop: asyncio.AbstractEventLoop,
    errors: list[OSError],
    info: AddrInfo,
    local: list[AddrInfo] | None,
) -> socket.socket:
    """One socket for ``info``: bound to the local address of its family, if any, then
    connected. Closed if anything fails; an OSError is also recorded in ``errors``."""
    family, type_, proto, _, address = info
    sock: socket.socket | None = None
    try:
        sock = socket.socket(family, type_, proto)  # EMFILE here is this attempt's error
        sock.setblocking(False)
        if local is not None:
            bind_error: OSError | None = None
            for lfamily, _, _, _, laddr in local:
                if lfamily != family:
                    continue  # another family's address
                try:
                    sock.bind(laddr)
                    break
                except OSError as exc:
                    bind_error = OSError(
                        exc.errno,
                        f"error while attempting to bind on address {laddr!r}: "
                        f"{(exc.strerror or '').lower()}",
                    )
            else:
                raise bind_error or OSError(
                    f"no matching local address with family={family!r} found"
                )
        await loop.sock_connect(sock, address)
        return sock
    except OSError as exc:
        errors.append(exc)
        if sock is not None:
            sock.close()
        raise
    except BaseException:
        if sock is not None:
            sock.close()
        raise


async def connected_socket(
    host: Any,
    port: Any,
    *,
    family: int = 0,
    proto: int = 0,
    flags: int = 0,
    local_addr: Any = None,
    happy_eyeballs_delay: float | None = None,
    interleave: int | None = None,
) -> socket.socket:
    """A new non-blocking socket connected to ``host:port``, as
    ``loop.create_connection`` makes one (same arguments, same errors: one attempt's
    error, or ``OSError("Multiple exceptions: ...")``)."""
    loop = asyncio.get_running_loop()
    if happy_eyeballs_delay is not None and interleave is None:
        interleave = 1  # as asyncio: happy eyeballs alternates the families
    infos = await _resolved(loop, host, port, family=family, proto=proto, flags=flags)
    local = None
    if local_addr is not None:
        local = await _resolved(
            loop, local_addr[0], local_addr[1], family=family, proto=proto, flags=flags
        )
    if interleave:
        infos = _interleaved(infos, interleave)
    errors: list[OSError] = []
    sock: socket.socket | None = None
    if happy_eyeballs_delay is None:
        for info in infos:
            try:
                sock = await _attempt(loop, errors, info, local)
                break
            except OSError:
                continue
    else:
        sock, _, _ = await staggered.staggered_race(
            (functools.partial(_attempt, loop, errors, info, local) for info in infos),
            happy_eyeballs_delay,
        )
    if sock is None:
        if not errors:  # (every attempt records its OSError; this is only a guard)
            raise OSError(f"could not connect to {host!r}:{port!r}")
        if len(errors) == 1 or all(str(e) == str(errors[0]) for e in errors):
            raise errors[0]
        raise OSError(f"Multiple exceptions: {', '.join(str(e) for e in errors)}")
    return sock


def _hosts(host: Any) -> list[Any]:
    if host == "":
        return [None]
    if isinstance(host, str) or not isinstance(host, collections.abc.Iterable):
        return [host]
    return list(host)


async def listening_sockets(
    host: Any,
    port: Any,
    *,
    family: int,
    flags: int,
    reuse_address: bool | None,
    reuse_port: bool | None,
) -> list[socket.socket]:
    """One bound, non-blocking (not yet listening) socket per address of ``host``, as
    ``loop.create_server`` binds them; all closed if one fails."""
    loop = asyncio.get_running_loop()
    if reuse_address is None:
        reuse_address = True  # as asyncio on POSIX
    resolved = await asyncio.gather(
        *(_resolved(loop, h, port, family=family, flags=flags) for h in _hosts(host))
    )
    infos = set(itertools.chain.from_iterable(resolved))  # each address bound once
    sockets: list[socket.socket] = []
    try:
        for af, type_, proto, _, address in infos:
            try:
                sock = socket.socket(af, type_, proto)
            except OSError:
                continue  # a family this host lacks, as asyncio skips it
            sockets.append(sock)
            if reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, True)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if af == socket.AF_INET6:
                # Linux listens on both families through one IPv6 socket by default;
                # the IPv4 socket beside it would then fail to bind (EADDRINUSE).
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, True)
            try:
                sock.bind(address)
            except OSError as err:
                raise OSError(
                    err.errno,
                    f"error while attempting to bind on address {address!r}: "
                    f"{(err.strerror or '').lower()}",
                ) from None
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def check_tls_options(
    ssl: Any, ssl_handshake_timeout: float | None, ssl_shutdown_timeout: float | None
) -> None:
    if ssl_handshake_timeout is not None and not ssl:
        raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
    if ssl_shutdown_timeout is not None and not ssl:
        raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")


def _given_socket(sock: socket.socket, host: Any, port: Any, resolution: dict[str, Any]) -> None:
    """Check a caller's socket (``sock=``) before anything changes: a refused socket is
    left as it was, open and in its blocking mode (as asyncio's ``create_connection``)."""
    if host is not None or port is not None:
        raise ValueError("host/port and sock can not be specified at the same time")
    given = sorted(k for k, v in resolution.items() if v)
    if given:
        raise ValueError(f"{', '.join(given)}: address resolution options, not for sock")
    if not isinstance(sock, socket.socket):
        raise TypeError(f"sock must be a socket.socket, not {type(sock).__name__}")
    check_ssl_socket(sock)
    # The transport needs TCP (MSG_ZEROCOPY, SO_ZEROCOPY): checked here, not after it
    # has made the socket non-blocking.
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"a connected TCP stream socket was expected, got {sock!r}")
    try:
        sock.getpeername()
    except OSError as exc:
        raise ValueError(f"a connected socket was expected ({exc.strerror}): {sock!r}") from None


async def socket_for(
    host: Any,
    port: Any,
    sock: socket.socket | None,
    *,
    family: int,
    proto: int,
    flags: int,
    local_addr: Any,
    happy_eyeballs_delay: float | None,
    interleave: int | None,
) -> socket.socket:
    """``sock`` checked and used as is, or a new socket connected to ``host:port``."""
    if sock is not None:
        resolution = {"family": family, "proto": proto, "flags": flags, "local_addr": local_addr}
        _given_socket(sock, host, port, resolution)
        return sock
    if host is None or port is None:
        raise ValueError("host and port must both be given when no sock is")
    return await connected_socket(
        host,
        port,
        family=family,
        proto=proto,
        flags=flags,
        local_addr=local_addr,
        happy_eyeballs_delay=happy_eyeballs_delay,
        interleave=interleave,
    )


def server_hostname_for(ssl: Any, host: Any, server_hostname: str | None) -> str | None:
    """As asyncio's create_connection: checked before anything is made."""
    if server_hostname is not None and not ssl:
        raise ValueError("server_hostname is only meaningful with ssl")
    if server_hostname is None and ssl:
        if not host:
            raise ValueError("You must set server_hostname when using ssl without a host")
        return str(host)
    return server_hostname
