"""NetLab itself: loss that is exact and counted, bad input refused, and namespaces that
do not outlive their lab (SIGTERM, a killed owner)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from pagefrag.testing.netlab import RECEIVER_IP, NetLab, lab_namespaces, missing_tools

pytestmark = pytest.mark.skipif(missing_tools() is not None, reason=str(missing_tools()))


def loss_tables(lab: NetLab) -> str:
    return lab.ns(lab.receiver, "nft", "list", "tables")


def udp_pair(lab: NetLab) -> tuple[socket.socket, socket.socket]:
    rx = lab.open_socket(lab.receiver, type=socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rx.bind((RECEIVER_IP, 0))
    rx.settimeout(0.3)
    tx = lab.open_socket(lab.sender, type=socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    return tx, rx


def send_numbered(tx: socket.socket, rx: socket.socket, first: int, count: int) -> list[int]:
    """Send datagrams ``first``.. in batches small enough for every queue on the way;
    the numbers that arrived."""
    got: list[int] = []
    for start in range(first, first + count, 100):
        for n in range(start, min(start + 100, first + count)):
            tx.send(n.to_bytes(4, "big") + bytes(60))
        while True:
            try:
                got.append(int.from_bytes(rx.recv(100)[:4], "big"))
            except TimeoutError:
                break
    return got


@pytest.fixture
def udp(lab: NetLab) -> Iterator[tuple[socket.socket, socket.socket]]:
    tx, rx = udp_pair(lab)
    yield tx, rx
    tx.close()
    rx.close()


@pytest.mark.parametrize("bad", [-3, 101, 150])
def test_add_loss_outside_0_to_100_is_a_value_error_and_changes_nothing(
    lab: NetLab, bad: int
) -> None:
    with pytest.raises(ValueError, match="between 0 and 100"):
        lab.add_loss(bad)
    assert "pagefrag_loss" not in loss_tables(lab)
    assert lab.dropped() == 0


@pytest.mark.parametrize("bad", [2.5, "2", True, None])
def test_add_loss_of_a_non_integer_is_a_type_error(lab: NetLab, bad: object) -> None:
    with pytest.raises(TypeError):
        lab.add_loss(bad)  # type: ignore[arg-type]
    assert "pagefrag_loss" not in loss_tables(lab)


def test_loss_2_drops_exactly_2_of_every_100_frames_evenly_spaced(
    lab: NetLab, udp: tuple[socket.socket, socket.socket]
) -> None:
    tx, rx = udp
    lab.add_loss(2)
    got = send_numbered(tx, rx, 0, 1000)
    assert lab.dropped() == 20
    missing = sorted(set(range(1000)) - set(got))
    assert missing == [n for n in range(1000) if n % 100 in (49, 99)]


def test_loss_100_drops_everything_and_0_removes_the_loss(
    lab: NetLab, udp: tuple[socket.socket, socket.socket]
) -> None:
    tx, rx = udp
    lab.add_loss(100)
    got = send_numbered(tx, rx, 0, 100)
    assert lab.dropped() == 100
    assert got == []
    lab.add_loss(0)
    assert "pagefrag_loss" not in loss_tables(lab)
    assert sorted(send_numbered(tx, rx, 100, 100)) == list(range(100, 200))
    assert lab.dropped() == 100  # the count survives the rule's removal
    lab.add_loss(50)
    got = send_numbered(tx, rx, 200, 100)
    assert lab.dropped() == 150
    assert len(got) == 50


def test_loss_0_adds_no_rule(lab: NetLab) -> None:
    lab.add_loss(0)
    assert "pagefrag_loss" not in loss_tables(lab)
    assert lab.dropped() == 0


def test_loss_100_stops_tcp_connecting(lab: NetLab) -> None:
    lab.add_loss(100)
    listener = lab.open_socket(lab.receiver)
    listener.bind((RECEIVER_IP, 0))
    listener.listen(1)
    client = lab.open_socket(lab.sender)
    client.settimeout(1.5)
    try:
        client.connect(listener.getsockname())
        connected = True
    except TimeoutError:
        connected = False
    client.close()
    listener.close()
    assert lab.dropped() >= 1  # the SYN, and its retransmission
    assert not connected


HOLDER = """
import sys, time
from pagefrag.testing.netlab import NetLab
with NetLab() as lab:
    print(lab.sender, lab.receiver, flush=True)
    time.sleep(120)
"""


def start_holder() -> tuple[subprocess.Popen[str], list[str]]:
    """A program that builds a lab and sleeps in it; its namespace names."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    names = proc.stdout.readline().split()
    assert len(names) == 2, proc.stderr.read() if proc.stderr else ""
    assert set(names) <= set(lab_namespaces(proc.pid))
    return proc, names


def test_a_program_terminated_with_sigterm_deletes_its_namespaces() -> None:
    proc, names = start_holder()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(30)
    finally:
        proc.kill()
    assert rc == 128 + signal.SIGTERM
    assert not set(names) & set(lab_namespaces())
    assert proc.stderr is not None and "Traceback" not in proc.stderr.read()


def test_a_killed_programs_namespaces_are_deleted_when_the_next_lab_ends() -> None:
    """SIGKILL cannot be caught: the namespaces stay until a lab starts or ends."""
    with NetLab():
        proc, names = start_holder()
        proc.kill()
        proc.wait(30)
        assert set(names) <= set(lab_namespaces())  # nobody cleaned up (yet)
    assert not set(names) & set(lab_namespaces())


@pytest.fixture
def default_sigterm() -> Iterator[None]:
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, before)


def test_sigterm_handler_lives_only_as_long_as_the_labs(default_sigterm: None) -> None:
    with NetLab():
        first = signal.getsignal(signal.SIGTERM)
        assert first is not signal.SIG_DFL
        with NetLab():
            assert signal.getsignal(signal.SIGTERM) is first
        assert signal.getsignal(signal.SIGTERM) is first
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_programs_own_sigterm_handler_is_left_alone(default_sigterm: None) -> None:
    def mine(signum: int, frame: object) -> None:
        pass

    signal.signal(signal.SIGTERM, mine)
    with NetLab():
        assert signal.getsignal(signal.SIGTERM) is mine
    assert signal.getsignal(signal.SIGTERM) is mine


def test_a_lab_in_a_thread_installs_no_handler(default_sigterm: None) -> None:
    seen: list[object] = []

    def body() -> None:
        with NetLab() as lab:
            seen.append(signal.getsignal(signal.SIGTERM))
            seen.append(set(lab_namespaces(os.getpid())) >= {lab.sender, lab.receiver})

    t = threading.Thread(target=body)
    t.start()
    t.join(60)
    assert seen == [signal.SIG_DFL, True]


def test_sigterm_in_the_middle_of_a_lab_raises_system_exit_and_the_lab_cleans_up(
    default_sigterm: None,
) -> None:
    with pytest.raises(SystemExit) as info, NetLab() as lab:
        names = {lab.sender, lab.receiver}
        handler = signal.getsignal(signal.SIGTERM)
        # called as Python calls it when SIGTERM arrives (a real kill would end the
        # test runner if the handler were missing)
        assert callable(handler), "no SIGTERM handler while the lab lives"
        handler(signal.SIGTERM, None)
    assert info.value.code == 128 + signal.SIGTERM
    assert not names & set(lab_namespaces())
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
