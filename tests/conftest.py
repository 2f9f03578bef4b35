from __future__ import annotations

import functools
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import LOOPS, STREAMS, Fired, Run, run_on

from pagefrag.testing.netlab import NetLab, lab_namespaces, missing_tools, remove_stale
from pagefrag.testing.netlab import run as netlab_run


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Run:
    """``run(coro, timeout=60)`` on each event loop of :data:`helpers.LOOPS`."""
    return functools.partial(run_on, request.param)


@pytest.fixture(params=list(STREAMS))
def streams(request: pytest.FixtureRequest) -> Any:
    """The module whose ``open_connection`` / ``start_server`` a side-by-side test body
    uses: asyncio's own, or pagefrag.aio (issue 11: a drop-in for asyncio streams)."""
    return STREAMS[request.param]


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


@pytest.fixture(autouse=True, scope="session")
def no_namespaces_left_behind() -> Iterator[None]:
    """At the end of the run no lab namespace may be left: this process's labs must have
    deleted theirs (asserted); those of processes that died (a killed CLI run, whose
    namespaces a later lab would have removed) are deleted here."""
    yield
    if missing_tools() is not None:
        return
    remove_stale()
    left = lab_namespaces(os.getpid())
    for ns in left:
        netlab_run("ip", "netns", "del", ns, check=False)
    assert not left, f"the test run left namespaces behind: {left}"


@pytest.fixture
def lab() -> Iterator[NetLab]:
    """Two network namespaces joined by veth, deleted afterwards (root only)."""
    why = missing_tools()
    if why is not None:
        pytest.skip(why)
    with NetLab() as lab:
        yield lab
