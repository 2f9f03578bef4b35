"""pagefrag:// under real Dask (issue 14): a ``LocalCluster`` whose two worker processes
move >= 256 MiB of NumPy data between each other (the result equal to ``tcp://``'s), the
``dask scheduler`` / ``dask worker`` command lines with a ``Client``, and the seed's
hazard through Dask's comm API: arrays overwritten or freed the moment ``write()``
returns, across two network namespaces with 2 % loss, while TCP retransmits.

Every cluster, process group, namespace and comm made here is closed or killed before
its test ends, also when it fails."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import SRC, Run, comm_across

pytest.importorskip("distributed")
import dask
import dask.array as da
from distributed import Client, LocalCluster, wait
from distributed.comm import connect, listen

from pagefrag.testing.netlab import RECEIVER_IP, NetLab
from pagefrag.uring import unsupported_reason

MIB = 1 << 20
TRANSFER_AT_LEAST = 256 * MIB
N = 6000  # x is N x N float64: 288 MB, all of it moved from one worker to the other
CHUNK = 1500
SEED = 14
POISON64 = 0xEEEE_EEEE_EEEE_EEEE


# -- item 1: a LocalCluster moving >= 256 MiB worker to worker ---------------------------
def workload(protocol: str) -> dict[str, Any]:
    """Start the cluster, persist x (seeded) on worker a only, compute (x + x.T).sum() on
    worker b only (every chunk of x crosses), and gather what the workers logged."""
    out: dict[str, Any] = {}

    def comm_totals(dask_worker: Any) -> dict[str, Any]:
        # Runs in a worker process (sent by value: defined here, not importable there):
        # the live pagefrag comms' byte counts and which bridge their transports are.
        from pagefrag.dask.comm import PagefragComm

        comms = [o for o in gc.get_objects() if isinstance(o, PagefragComm)]
        transports = {type(c._protocol.transport).__name__ for c in comms}
        return {
            "written": sum(c.stats()["bytes_written"] for c in comms),
            "read": sum(c.stats()["bytes_read"] for c in comms),
            "sends": sum(c.stats()["zerocopy"].sends for c in comms if c.stats()["zerocopy"]),
            "transports": sorted(transports - {"NoneType"}),
        }

    with (
        LocalCluster(
            protocol=protocol,
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            scheduler_kwargs={"dashboard": False},  # no HTTP server: nothing to test there
        ) as cluster,
        Client(cluster) as client,
    ):
        out["scheduler"] = cluster.scheduler_address
        workers = sorted(client.scheduler_info()["workers"])
        out["workers"] = workers
        a, b = workers
        x = da.random.default_rng(SEED).random((N, N), chunks=CHUNK)
        x = x.persist(workers=[a], allow_other_workers=False)
        wait(x, timeout=120)
        y = (x + x.T).sum()
        out["result"] = y.compute(workers=[b], allow_other_workers=False)
        out["incoming"] = client.run(
            lambda dask_worker: [(d["total"], d["who"]) for d in dask_worker.transfer_incoming_log]
        )
        out["outgoing"] = client.run(
            lambda dask_worker: [
                (d["total"], d["compressed"], d["who"]) for d in dask_worker.transfer_outgoing_log
            ]
        )
        if protocol == "pagefrag":
            out["comms"] = client.run(comm_totals)
        out["a"], out["b"] = a, b
    return out


@pytest.fixture(scope="module")
def tcp_run() -> dict[str, Any]:
    return workload("tcp")


@pytest.fixture(scope="module")
def pagefrag_run() -> dict[str, Any]:
    return workload("pagefrag")


def check_transfers(run: dict[str, Any], tcp: dict[str, Any]) -> None:
    a, b = run["a"], run["b"]
    assert run["scheduler"].startswith("pagefrag://")
    assert all(w.startswith("pagefrag://") for w in run["workers"]), run["workers"]
    # What b fetched (Dask's own log of its transfers: the arrays' nbytes) came from a.
    incoming = run["incoming"][b]
    assert {who for _, who in incoming} == {a}
    assert sum(total for total, _ in incoming) >= TRANSFER_AT_LEAST
    # What a sent to b, as PagefragComm.write() returned it (bytes on the wire).
    sent = [(total, written) for total, written, who in run["outgoing"][a] if who == b]
    assert sum(written for _, written in sent) >= TRANSFER_AT_LEAST
    # And the comms themselves: a wrote, b read, >= 256 MiB (their stats()).
    comms = run["comms"]
    assert comms[a]["written"] >= TRANSFER_AT_LEAST, comms
    assert comms[b]["read"] >= TRANSFER_AT_LEAST, comms
    assert comms[a]["sends"] > 0, comms  # through the pagefrag bridge's socket
    assert run["result"] == tcp["result"]  # the same graph, seed and reduction order
    assert tcp["workers"][0].startswith("tcp://")


def test_local_cluster_moves_256_mib_worker_to_worker_equal_to_tcp(
    pagefrag_run: dict[str, Any], tcp_run: dict[str, Any]
) -> None:
    """LocalCluster(protocol="pagefrag", 2 worker processes): every chunk of a 288 MB
    array crosses from one worker to the other; Dask's transfer logs and the comms'
    stats() show >= 256 MiB moved over pagefrag://; the sum equals tcp://'s."""
    check_transfers(pagefrag_run, tcp_run)


# -- item 4: the same with the bridge chosen through Dask's config in the environment ------
@pytest.mark.parametrize("backend", ["msg_zerocopy", "uring"])
def test_local_cluster_with_the_bridge_set_in_the_environment(
    backend: str, tcp_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DASK_DISTRIBUTED__COMM__PAGEFRAG__BACKEND reaches the worker processes: their comms
    use that bridge (msg_zerocopy: ZeroCopyTransport, uring: UringTransport), and the run
    of the test above still moves >= 256 MiB and matches tcp://."""
    if backend == "uring" and (why := unsupported_reason()) is not None:
        pytest.skip(f"backend='uring' cannot run here: {why}")
    monkeypatch.setenv("DASK_DISTRIBUTED__COMM__PAGEFRAG__BACKEND", backend)
    with dask.config.set({"distributed.comm.pagefrag.backend": backend}):  # this process
        run = workload("pagefrag")
    check_transfers(run, tcp_run)
    want = {"msg_zerocopy": "ZeroCopyTransport", "uring": "UringTransport"}[backend]
    for worker, comms in run["comms"].items():
        assert comms["transports"] == [want], (worker, comms)


# -- item 2: the command lines ------------------------------------------------------------
def _spawn(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as f:
        return subprocess.Popen(
            argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process group (a nanny and its worker), a bounded wait, then SIGKILL
    for what is left of the group."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # also what the group leader left behind
        p.wait(10)


def test_dask_scheduler_and_worker_command_lines(tmp_path: Path) -> None:
    """`dask scheduler --protocol pagefrag --port 0`, `dask worker pagefrag://...` (with
    its nanny) and `dask worker --protocol pagefrag` (no nanny), then
    Client("pagefrag://host:port") runs a computation that moves data between them."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    sched_file = tmp_path / "scheduler.json"
    dask_cli = [sys.executable, "-m", "dask"]
    common = ["--no-dashboard", "--nthreads", "1", "--death-timeout", "60"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            _spawn(
                [
                    *(*dask_cli, "scheduler", "--protocol", "pagefrag", "--host", "127.0.0.1"),
                    *("--port", "0", "--no-dashboard", "--scheduler-file", str(sched_file)),
                ],
                tmp_path / "scheduler.log",
                env,
            )
        )
        deadline = time.monotonic() + 60
        address = None
        while address is None:
            assert procs[0].poll() is None, (tmp_path / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "the scheduler wrote no scheduler file"
            with contextlib.suppress(FileNotFoundError, ValueError):
                address = json.loads(sched_file.read_text())["address"]
            time.sleep(0.1)
        assert address.startswith("pagefrag://127.0.0.1:")
        procs.append(_spawn([*dask_cli, "worker", address, *common], tmp_path / "worker1.log", env))
        procs.append(
            _spawn(
                [
                    *(*dask_cli, "worker", "--protocol", "pagefrag", "--no-nanny"),
                    *("--scheduler-file", str(sched_file), *common),
                ],
                tmp_path / "worker2.log",
                env,
            )
        )
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=90)
            workers = sorted(client.scheduler_info()["workers"])
            assert len(workers) == 2 and all(w.startswith("pagefrag://") for w in workers)
            x = client.submit(np.arange, 1 << 20, workers=[workers[0]], pure=False)
            y = client.submit(np.multiply, x, 3, workers=[workers[1]], pure=False)
            total = client.submit(np.sum, y, workers=[workers[0]], pure=False)
            assert total.result(timeout=60) == 3 * ((1 << 20) * ((1 << 20) - 1) // 2)
            got = client.run(lambda dask_worker: len(dask_worker.transfer_incoming_log))
            assert all(n >= 1 for n in got.values()), got  # both directions crossed
    except BaseException:
        for log in sorted(tmp_path.glob("*.log")):
            sys.stderr.write(f"--- {log.name}\n{log.read_text()[-4000:]}\n")
        raise
    finally:
        _stop(procs[1:])  # the workers first: they need not wait for a scheduler gone
        _stop(procs[:1])
    assert all(p.returncode is not None for p in procs)


# -- item 3: the seed's hazard through Dask's comm API ------------------------------------
SIZES = (MIB, 256 * 1024 + 8)  # two arrays per message, the second of an odd size
MESSAGES = 64  # ~84 MB: dozens of drops at 2 %, hundreds of retransmitted segments


def pattern(i: int, k: int) -> np.ndarray:
    """Message i's array k: u64 counters no other array of the run shares."""
    n = SIZES[k] // 8
    start = (2 * i + k) << 32
    return np.arange(start, start + n, dtype="<u8")


def retransmits(lab: NetLab) -> int:
    """TCP segments retransmitted in the sender namespace (its /proc/net/snmp)."""
    rows = [r.split() for r in lab.ns(lab.sender, "cat", "/proc/net/snmp").splitlines()]
    tcp = [r for r in rows if r and r[0] == "Tcp:"]
    return int(tcp[1][tcp[0].index("RetransSegs")])


async def hazard_run(
    lab: NetLab, backend: str, *, wait_for_release: bool, free: bool
) -> dict[str, Any]:
    """A pagefrag:// listener in the receiver namespace checking every array of every
    message; a client in the sender namespace writing MESSAGES messages {"a", "b", "i"}
    (NumPy arrays: pickle-5 out-of-band frames, sent by reference) and, as soon as each
    write() returns, overwriting both arrays with poison (``free=False``) or dropping
    them and filling fresh arrays of the same sizes with poison (``free=True``)."""
    result: dict[str, Any] = {"bad": [], "alive_after_free": 0, "refs": []}
    config = {
        "distributed.comm.pagefrag.backend": backend,
        "distributed.comm.pagefrag.zerocopy": "always",  # every large frame by reference
        "distributed.comm.pagefrag.wait-for-release": wait_for_release,
    }

    async def receive(comm: Any) -> None:
        try:
            for _ in range(MESSAGES):
                msg = await comm.read()
                for k, key in enumerate("ab"):
                    if not np.array_equal(msg[key], pattern(msg["i"], k)):
                        result["bad"].append((msg["i"], key))
            await comm.write({"received": MESSAGES, "bad": len(result["bad"])})
            with contextlib.suppress(OSError):
                await comm.read()  # until the sender closes: its last write is done
        finally:
            await comm.close()

    with dask.config.set(config):
        with lab.inside(lab.receiver):  # the listening socket is made in this namespace
            listener = listen(f"pagefrag://{RECEIVER_IP}:0", receive)
            await listener.start()
        comm = None
        try:
            with lab.inside(lab.sender):
                comm = await connect(listener.contact_address, timeout=30)
            junk: list[np.ndarray] = []
            for i in range(MESSAGES):
                a, b = pattern(i, 0), pattern(i, 1)
                await comm.write({"a": a, "b": b, "i": i})
                if free:
                    refs = [weakref.ref(a), weakref.ref(b)]
                    del a, b
                    result["alive_after_free"] += sum(r() is not None for r in refs)
                    result["refs"] += refs
                    # Fresh arrays take the freed memory, if it was freed: poison in it.
                    junk = [*junk[-8:], *(np.full(s // 8, POISON64, "<u8") for s in SIZES)]
                else:
                    a[:] = POISON64
                    b[:] = POISON64
                    del a, b
            result["stats"] = comm.stats()
            result["reply"] = await asyncio.wait_for(comm.read(), 60)
        finally:
            if comm is not None:
                await comm.close()
            listener.stop()
    return result


BACKENDS = ["msg_zerocopy", "uring"]


def _skip_unsupported(backend: str) -> None:
    if backend == "uring" and (why := unsupported_reason()) is not None:
        pytest.skip(f"backend='uring' cannot run here: {why}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_overwrite_after_write_under_loss_through_dask(lab: NetLab, run: Run, backend: str) -> None:
    """The seed's hazard through Dask: each array is overwritten with poison the moment
    comm.write() returns, across veth with 2 % loss (TCP retransmits from the very
    pages); every array arrives intact, because write() returned only once the kernel
    had released its frames (wait-for-release, the default). tests/mutate.py M11 makes
    write() return without waiting: this test then fails."""
    _skip_unsupported(backend)
    lab.add_loss(2)
    before = retransmits(lab)
    result = run(hazard_run(lab, backend, wait_for_release=True, free=False), timeout=120)
    assert lab.dropped() > 0, "the loss rule dropped nothing"
    assert retransmits(lab) > before, "2 % loss must cause TCP retransmits"
    assert result["stats"]["zerocopy"].zerocopy_sends > 0
    assert result["bad"] == [], f"{len(result['bad'])} corrupted arrays: {result['bad'][:8]}"
    assert result["reply"] == {"received": MESSAGES, "bad": 0}


@pytest.mark.parametrize("backend", BACKENDS)
def test_free_after_write_without_waiting_under_loss_through_dask(
    lab: NetLab, run: Run, backend: str
) -> None:
    """wait-for-release=False: write() returns once the frames are queued, and the
    caller drops each array at once and fills new arrays of the same sizes with poison.
    The pins keep the dropped arrays alive (some were still alive right after their
    last reference went: the kernel or the queue held them) until the kernel released
    them, so every array arrives intact under 2 % loss; afterwards all are freed."""
    _skip_unsupported(backend)
    lab.add_loss(2)
    result = run(hazard_run(lab, backend, wait_for_release=False, free=True), timeout=120)
    assert lab.dropped() > 0, "the loss rule dropped nothing"
    assert result["alive_after_free"] > 0, "no array outlived its last reference: untested"
    assert result["bad"] == [], f"{len(result['bad'])} corrupted arrays: {result['bad'][:8]}"
    assert result["reply"] == {"received": MESSAGES, "bad": 0}
    gc.collect()
    assert all(r() is None for r in result["refs"]), "a released array was kept alive"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_write_the_peer_reads_and_then_closes_returns_its_byte_count(
    run: Run, backend: str
) -> None:
    """As over tcp://: a write whose message the peer reads and then closes the
    connection (a reply and goodbye) returns its byte count. With wait-for-release the
    kernel reports the pages released when the ACK comes, often with the peer's FIN: the
    write must not then raise CommClosedError as though the message had been lost (it
    did, 19 times in 20, before the fix). Loopback, every large frame by reference."""
    _skip_unsupported(backend)
    rounds = 10
    config = {
        "distributed.comm.pagefrag.backend": backend,
        "distributed.comm.pagefrag.zerocopy": "always",
    }

    async def main() -> list[Any]:
        outcomes: list[Any] = []
        read: list[int] = []

        async def reply_and_goodbye(comm: Any) -> None:
            try:
                read.append((await comm.read())["i"])
            finally:
                await comm.close()

        listener = listen("pagefrag://127.0.0.1:0", reply_and_goodbye)
        await listener.start()
        try:
            for i in range(rounds):
                comm = await connect(listener.contact_address, timeout=30)
                try:
                    outcomes.append(await comm.write({"a": pattern(i, 0), "i": i}))
                except OSError as exc:
                    outcomes.append(exc)
                finally:
                    await comm.close()
        finally:
            listener.stop()
        deadline = time.monotonic() + 30
        while len(read) < rounds and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert sorted(read) == list(range(rounds))  # the peer did read every message
        return outcomes

    with dask.config.set(config):
        outcomes = run(main(), timeout=120)
    failed = [o for o in outcomes if not isinstance(o, int)]
    assert not failed, f"{len(failed)} of {rounds} writes raised: {failed[0]!r}"
    assert all(o > SIZES[0] for o in outcomes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_write_whose_bytes_never_reach_the_kernel_still_raises(
    lab: NetLab, run: Run, backend: str
) -> None:
    """The other side of the test above: a 32 MiB message goes to a peer no frame
    reaches any more (100 % loss): the socket takes a window's worth, the rest waits
    (in the transport's queue, or in the io_uring request in flight); then the comm is
    aborted. Those bytes never reach the socket, and write() raises CommClosedError."""
    _skip_unsupported(backend)
    config = {
        "distributed.comm.pagefrag.backend": backend,
        "distributed.comm.pagefrag.zerocopy": "always",
    }

    async def main() -> Any:
        async with comm_across(lab) as comm:
            lab.add_loss(100)
            write = asyncio.ensure_future(comm.write({"big": np.ones(32 * MIB // 8)}))
            try:
                deadline = time.monotonic() + 30
                # Queued whole (pinned or unsent; an io_uring request in flight counts as
                # pinned): the socket takes a window's worth at most, no ACK comes.
                while comm.unsent_bytes + comm.pinned_bytes < 32 * MIB and not write.done():
                    assert time.monotonic() < deadline, "the message was never queued"
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0.1)
                assert not write.done()
                comm.abort()
                return (await asyncio.gather(write, return_exceptions=True))[0]
            finally:
                write.cancel()
                comm.abort()

    with dask.config.set(config):
        outcome = run(main(), timeout=120)
    assert lab.dropped() > 0
    assert "the connection ended during the write" in str(outcome), repr(outcome)


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_is_bounded_by_linger_and_keeps_the_pins_until_the_kernel_releases(
    lab: NetLab, run: Run, backend: str
) -> None:
    """close() with frames in flight to a peer no frame reaches (100 % loss) returns
    once linger (1 s here) has passed, not when TCP gives up; the pages the kernel
    holds stay pinned past it (the caller's array is still referenced), and are
    released, with nothing lost, once the loss is lifted."""
    _skip_unsupported(backend)
    config = {
        "distributed.comm.pagefrag.backend": backend,
        "distributed.comm.pagefrag.zerocopy": "always",
        "distributed.comm.pagefrag.wait-for-release": False,
        "distributed.comm.pagefrag.linger": "1s",
    }

    async def main() -> tuple[float, int, int]:
        async with comm_across(lab) as comm:
            lab.add_loss(100)
            array = np.arange(MIB, dtype="u8")  # 8 MiB
            alive = weakref.ref(array)  # a bare ndarray is weak-referenceable
            await asyncio.wait_for(comm.write({"a": array}), 30)  # queued, not released
            del array
            start = time.monotonic()
            await asyncio.wait_for(comm.close(), 30)
            took = time.monotonic() - start
            pinned = comm.pinned_bytes
            held = alive() is not None  # the pin keeps the memory alive past close()
            lab.add_loss(0)
            deadline = time.monotonic() + 60
            while (comm.pinned_bytes or alive() is not None) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                gc.collect()
            return took, pinned if held else -1, comm.pinned_bytes + (alive() is not None)

    with dask.config.set(config):
        took, pinned, left = run(main(), timeout=120)
    assert 0.9 <= took < 10, took
    assert pinned > 0, "close() past linger must keep the pages pinned (and the array alive)"
    assert left == 0, "the pins must go once the kernel releases the pages"


@pytest.fixture(autouse=True)
def no_threads_left_behind() -> Iterator[None]:
    """No thread a test starts (a cluster's loop, a comm's) outlives it. The one
    exception is distributed's process-wide offload executor (``Dask-Offload``), which
    an in-process scheduler starts at its first graph and keeps: it is distributed's
    own, not ours to stop."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 10
    while True:
        left = [
            t
            for t in set(threading.enumerate()) - before
            if t.is_alive() and not t.name.startswith("Dask-Offload")
        ]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"threads left behind: {left}"
