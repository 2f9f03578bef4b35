"""Issue 12: ``auto`` learns per destination, not per socket. A destination delivered
locally starts copying; what a socket learns is shared with later sockets to it (keyed by
network namespace), through a bounded cache that still re-probes; explicit modes ignore
it. Real sockets, real namespaces; time in the schedule tests is the policy's ``now``."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from helpers import Receiver, Run, run_on

from pagefrag import aio
from pagefrag.testing.netlab import RECEIVER_IP, SENDER_IP, NetLab, missing_tools
from pagefrag.zerocopy import ZeroCopySocket
from pagefrag.zerocopy import destinations as dest
from pagefrag.zerocopy.policy import State, ZeroCopyPolicy

MIB = bytes(1 << 20)
MIN = 1000


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    # Namespace inodes are reused after a lab is deleted: start every test empty.
    dest.DESTINATIONS.clear()
    yield
    dest.DESTINATIONS.clear()


def need_tools() -> None:
    why = missing_tools()
    if why is not None:
        pytest.skip(why)


def send_and_count(zs: ZeroCopySocket, server: socket.socket, n: int = 3) -> int:
    """Send ``n`` MiB through ``zs`` (read by a thread); the zero-copy calls made (a
    MiB may take several calls)."""
    rx = Receiver(server)
    for _ in range(n):
        zs.sendall(MIB, timeout=30)
    zerocopy = zs.stats.zerocopy_sends
    zs.close()
    assert len(rx.join()) == n * len(MIB)
    return zerocopy


def learn_copying(client: socket.socket, server: socket.socket) -> None:
    """Drive a socket to a peer whose delivery copies until auto stops asking."""
    rx = Receiver(server)
    zs = ZeroCopySocket(client, zerocopy="auto", completion_batch=1)
    for _ in range(300):
        zs.sendall(bytes(64 * 1024), timeout=30)
        if zs.stats.current_mode == "copy":
            break
    assert zs.stats.current_mode == "copy" and zs.stats.zerocopy_sends > 0
    zs.close()
    rx.join()


# -- local destinations start copying --------------------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1"])
def test_a_loopback_socket_in_auto_starts_copying(host: str) -> None:
    srv = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    client = socket.create_connection(srv.getsockname()[:2])
    server, _ = srv.accept()
    srv.close()
    zs = ZeroCopySocket(client, zerocopy="auto")
    assert zs.stats.current_mode == "copy"
    assert send_and_count(zs, server) == 0  # not even the first write asked for zero-copy
    server.close()
    assert len(dest.DESTINATIONS) == 0  # loopback copies everywhere: nothing to share


def test_aio_loopback_connection_in_auto_starts_copying(run: Run) -> None:
    async def main() -> tuple[int, int]:
        got = bytearray()

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while chunk := await reader.read(1 << 20):
                got.extend(chunk)
            writer.close()

        server = await asyncio.start_server(sink, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await aio.open_connection("127.0.0.1", port, zerocopy="auto")
        for _ in range(4):
            writer.write(MIB)
            writer.write_zerocopy(bytearray(MIB))
            await writer.drain()
        stats = writer.transport.zerocopy_stats
        writer.close()
        await writer.wait_closed()
        for _ in range(1000):  # bounded: the sink reads to EOF
            if len(got) == 8 * len(MIB):
                break
            await asyncio.sleep(0.01)
        server.close()
        await server.wait_closed()
        return stats.zerocopy_sends, len(got)

    zerocopy, received = run(main())
    assert received == 8 * len(MIB)
    assert zerocopy == 0


def test_a_remote_peer_in_a_namespace_starts_in_zerocopy(lab: NetLab) -> None:
    client, server = lab.tcp_pair()
    zs = ZeroCopySocket(client, zerocopy="auto")
    assert zs.stats.current_mode == "zerocopy"
    assert send_and_count(zs, server, 1) >= 1  # the first write went zero-copy
    server.close()


@pytest.mark.parametrize("bind_loopback", [False, True], ids=["own-source", "from-127"])
def test_one_of_the_namespaces_own_addresses_starts_copying(
    lab: NetLab, bind_loopback: bool
) -> None:
    """Inside the sender namespace, connect to its own veth address (198.18.0.1): local
    delivery. Bound to 127.0.0.1 the peer is not the socket's own address either, so
    only the namespace's address table (netlink) can tell."""
    with lab.inside(lab.sender):
        table = dest.local_addresses()
        assert (socket.AF_INET, socket.inet_aton(SENDER_IP)) in table
        assert (socket.AF_INET, socket.inet_aton(RECEIVER_IP)) not in table
        srv = socket.create_server((SENDER_IP, 0))
        client = socket.socket()
        if bind_loopback:
            client.bind(("127.0.0.1", 0))
        client.settimeout(10)
        client.connect(srv.getsockname())
        server, _ = srv.accept()
        srv.close()
        assert client.getpeername()[0] == SENDER_IP
        assert (client.getsockname()[0] == "127.0.0.1") is bind_loopback
        assert dest.is_local(client)
        zs = ZeroCopySocket(client, zerocopy="auto")
    assert zs.stats.current_mode == "copy"
    assert send_and_count(zs, server) == 0
    server.close()


def test_the_root_namespace_does_not_take_a_lab_address_for_its_own(lab: NetLab) -> None:
    with lab.inside(lab.receiver):
        assert (socket.AF_INET, socket.inet_aton(RECEIVER_IP)) in dest.local_addresses()
    assert (socket.AF_INET, socket.inet_aton(RECEIVER_IP)) not in dest.local_addresses()


# -- what a socket learns is shared, per namespace ----------------------------------------
def test_a_learned_copying_state_is_shared_with_the_next_socket_in_that_namespace_only(
    lab: NetLab,
) -> None:
    # TCP over veth into another namespace copies at delivery, but auto cannot know that
    # beforehand: the first socket learns it (8 copied completions).
    client, server = lab.tcp_pair()
    key = dest.destination_key(client)
    assert key[1:] == (socket.AF_INET, socket.inet_aton(RECEIVER_IP))
    learn_copying(client, server)
    server.close()
    entry = dest.DESTINATIONS.get(key)
    assert entry is not None and entry[0] is True
    client, server = lab.tcp_pair()
    assert dest.destination_key(client) == key
    zs = ZeroCopySocket(client, zerocopy="auto")
    assert zs.stats.current_mode == "copy"
    assert send_and_count(zs, server) == 0  # the next socket starts copying
    server.close()
    need_tools()
    with NetLab() as other:  # the same address, in another namespace: not learned there
        client, server = other.tcp_pair()
        assert dest.destination_key(client)[1:] == key[1:]
        assert dest.destination_key(client) != key
        zs = ZeroCopySocket(client, zerocopy="auto")
        assert zs.stats.current_mode == "zerocopy"
        assert send_and_count(zs, server, 1) >= 1
        server.close()


def test_a_probe_that_finds_zerocopy_is_shared_and_the_schedule_is_kept(lab: NetLab) -> None:
    client, server = lab.tcp_pair()
    cache = dest.DestinationCache()
    key = dest.destination_key(client)
    cache.record(key, True, 100.0)  # an earlier socket learned: copies, probed at 100.0

    def fresh() -> ZeroCopyPolicy:
        return ZeroCopyPolicy("auto", MIN, probe_every=10**9, probe_interval=2.0)

    p = fresh()
    assert dest.start_policy(p, client, 101.0, cache) == key
    assert p.state is State.COPYING
    assert not p.use_zerocopy(MIN, 101.9)
    q = fresh()
    dest.start_policy(q, client, 101.5, cache)
    assert q.state is State.COPYING
    assert p.use_zerocopy(MIN, 102.0) and p.state is State.PROBING  # the destination's clock
    assert cache.get(key) == (True, 102.0)  # state changes teach the cache
    p.on_completion(False, 1, 102.1)  # the probe went zero-copy for real
    assert p.state is State.ZEROCOPY and cache.get(key) == (False, 102.0)
    r = fresh()
    dest.start_policy(r, client, 103.0, cache)
    assert r.state is State.ZEROCOPY and r.use_zerocopy(MIN, 103.0)
    client.close()
    server.close()


def test_a_due_probe_is_claimed_by_one_new_socket_not_all(lab: NetLab) -> None:
    client, server = lab.tcp_pair()
    cache = dest.DestinationCache()
    key = dest.destination_key(client)
    cache.record(key, True, 0.0)
    policies = []
    for _ in range(3):
        p = ZeroCopyPolicy("auto", MIN, probe_every=10**9, probe_interval=2.0)
        dest.start_policy(p, client, 10.0, cache)
        policies.append(p)
    due = [p.use_zerocopy(MIN, 10.0) for p in policies]
    assert due == [True, False, False]  # the first claimed it; the others wait 2 s
    assert [p.use_zerocopy(MIN, 12.0) for p in policies[1:]] == [True, True]
    client.close()
    server.close()


# -- the cache ------------------------------------------------------------------------------
def test_the_cache_is_a_bounded_lru() -> None:
    cache = dest.DestinationCache(capacity=3)
    keys = [(1, socket.AF_INET, bytes([198, 18, 0, k])) for k in range(5)]
    for k in keys[:3]:
        cache.record(k, True, 0.0)
    assert cache.lookup(keys[0], 0.0, 2.0) == (True, 0.0)  # now the most recent
    cache.record(keys[3], False, 0.0)
    assert len(cache) == 3 and keys[1] not in cache and keys[0] in cache
    for k in keys:
        cache.record(k, True, 1.0)
    assert len(cache) == 3 and [k in cache for k in keys] == [False, False, True, True, True]
    assert dest.DESTINATIONS.capacity == 4096
    with pytest.raises(ValueError):
        dest.DestinationCache(0)
    with pytest.raises(TypeError):
        dest.DestinationCache(2.5)  # type: ignore[arg-type]


def test_an_evicted_destination_is_learned_again(lab: NetLab) -> None:
    client, server = lab.tcp_pair()
    cache = dest.DestinationCache(capacity=1)
    key = dest.destination_key(client)
    cache.record(key, True, 0.0)
    cache.record((0, socket.AF_INET, bytes(4)), True, 0.0)  # evicts key
    p = ZeroCopyPolicy("auto", MIN)
    dest.start_policy(p, client, 1.0, cache)
    assert p.state is State.ZEROCOPY  # forgotten: remote, so zero-copy again
    client.close()
    server.close()


# -- explicit modes --------------------------------------------------------------------------
def test_explicit_always_and_never_ignore_the_cache(lab: NetLab) -> None:
    client, server = lab.tcp_pair()
    key = dest.destination_key(client)
    dest.DESTINATIONS.record(key, True, 0.0)
    zs = ZeroCopySocket(client, zerocopy="always")
    assert send_and_count(zs, server, 1) >= 1
    server.close()
    assert dest.DESTINATIONS.get(key) == (True, 0.0)
    dest.DESTINATIONS.record(key, False, 0.0)
    client, server = lab.tcp_pair()
    zs = ZeroCopySocket(client, zerocopy="never")
    assert send_and_count(zs, server, 1) == 0
    server.close()
    assert dest.DESTINATIONS.get(key) == (False, 0.0)
    srv = socket.create_server(("127.0.0.1", 0))  # loopback, always: zero-copy still
    client = socket.create_connection(srv.getsockname())
    server, _ = srv.accept()
    srv.close()
    zs = ZeroCopySocket(client, zerocopy="always")
    assert send_and_count(zs, server, 1) >= 1
    server.close()


def test_known_copying_is_a_transition_of_the_table_only_from_zerocopy() -> None:
    p = ZeroCopyPolicy("auto", MIN, probe_interval=2.0)
    p.known_copying(5.0)
    assert p.state is State.COPYING and p.current == "copy"
    assert not p.use_zerocopy(MIN, 6.9) and p.use_zerocopy(MIN, 7.0)
    with pytest.raises(RuntimeError, match="PROBING on KNOWN_COPYING"):
        p.known_copying(8.0)
    for mode in ("always", "never"):
        q = ZeroCopyPolicy(mode, MIN)
        q.known_copying(0.0)  # a fixed mode ignores what the destination is known to do
        assert q.state is State[mode.upper()]


# -- set-up cost of a short connection -----------------------------------------------------
def test_aio_connects_to_a_numeric_address_without_the_resolver() -> None:
    """As asyncio: a numeric host is not passed to getaddrinfo (which runs in an executor
    thread; starting it cost the first short connection ~5 ms). A name still is. On
    asyncio's loop only: uvloop's sock_connect calls getaddrinfo itself."""

    async def main() -> list[object]:
        loop = asyncio.get_running_loop()
        asked: list[object] = []
        real = loop.getaddrinfo

        async def counting(host: object, *args: object, **kw: object) -> object:
            asked.append(host)
            return await real(host, *args, **kw)  # type: ignore[arg-type]

        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop.getaddrinfo = counting  # type: ignore[method-assign]
        for host, p in (("127.0.0.1", port), ("127.0.0.1", str(port)), ("localhost", port)):
            _, writer = await aio.open_connection(host, p)
            assert writer.get_extra_info("peername")[:2] == ("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return asked

    assert run_on("asyncio", main()) == ["localhost"]


UNPRIVILEGED = r"""
import ctypes, json, os, socket, sys
from pagefrag.zerocopy import ZeroCopySocket, destinations
libc = ctypes.CDLL(None, use_errno=True)
there = os.open(f"/run/netns/{sys.argv[1]}", os.O_RDONLY)
assert libc.setns(there, 0x40000000) == 0  # this thread stays in the lab's namespace
srv = socket.create_server((sys.argv[2], 0))
client = socket.socket()
client.bind(("127.0.0.1", 0))
client.connect(srv.getsockname())
server, _ = srv.accept()
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)  # no CAP_NET_ADMIN: SIOCGSKNS is refused
zs = ZeroCopySocket(client, zerocopy="auto")
print(json.dumps({"euid": os.geteuid(), "mode": zs.stats.current_mode,
                  "sksns": destinations._sksns_allowed}))
"""


def test_without_cap_net_admin_the_threads_namespace_table_is_read(lab: NetLab) -> None:
    """Unprivileged, the socket's namespace cannot be asked (SIOCGSKNS): the calling
    thread's is taken, and its address table (netlink needs no privilege) still says
    that the namespace's own address, reached from 127.0.0.1, is local."""
    if os.geteuid() != 0:
        pytest.skip("dropping to an unprivileged user needs root first")
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    out = subprocess.run(
        [sys.executable, "-c", UNPRIVILEGED, lab.sender, SENDER_IP],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.path.abspath(src)},
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"euid": 65534, "mode": "copy", "sksns": False}


def test_a_child_forked_while_a_thread_holds_the_locks_sets_up_sockets() -> None:
    """Found in review: the address tables' and the destination cache's locks are
    process-wide; forked while another thread held one, the child's first auto socket to
    a non-loopback peer blocked for ever. The child gets fresh locks."""
    import threading

    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with dest._tables_lock, dest.DESTINATIONS._lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: both lookups must return
            try:
                dest.local_addresses()
                dest.DESTINATIONS.lookup((0, socket.AF_INET, b"\xc6\x12\x00\x01"), 0.0, 1.0)
            finally:
                os._exit(0)
        deadline = 20.0
        while deadline > 0:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            threading.Event().wait(0.05)
            deadline -= 0.05
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child blocked on a lock held at the fork")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        holder.join(30)
