"""FragDestructor: counting, exactly-once firing, errors, waiting, threads, asyncio."""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

import pytest

from pagefrag import DestructorError, FragDestructor


def test_created_holding_the_creators_reference_and_fires_once_at_zero() -> None:
    calls: list[Any] = []
    d = FragDestructor(calls.append, "rpc-7")
    assert d.refcount == 1 and not d.done
    d.ref()
    d.unref()
    assert calls == [] and d.refcount == 1
    d.unref()
    assert calls == ["rpc-7"] and d.done and d.refcount == 0


def test_ref_after_destroy_and_unref_below_zero_raise_and_change_nothing() -> None:
    calls: list[Any] = []
    d = FragDestructor(calls.append)
    d.unref()
    with pytest.raises(DestructorError):
        d.ref()
    with pytest.raises(DestructorError):
        d.unref()
    assert d.refcount == 0 and calls == [None]


def test_destroy_exception_goes_to_unraisablehook_and_still_counts_as_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)

    def boom(_: object) -> None:
        raise ValueError("owner bug")

    d = FragDestructor(boom)
    after: list[FragDestructor] = []
    d.add_done_callback(after.append)
    d.unref()
    assert d.done and after == [d]
    assert len(seen) == 1 and isinstance(seen[0].exc_value, ValueError)
    assert "destroy" in seen[0].err_msg


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_ctrl_c_inside_destroy_or_a_callback_is_raised_once_the_firing_is_complete(
    monkeypatch: pytest.MonkeyPatch, interrupt: type[BaseException]
) -> None:
    # Fails on the old code: the interrupt went to sys.unraisablehook and unref()
    # returned, so a Ctrl-C landing in a release callback was lost.
    seen: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    calls: list[str] = []

    def destroy(_: object) -> None:
        calls.append("destroy")
        raise interrupt()

    d = FragDestructor(destroy)
    d.add_done_callback(lambda _: calls.append("first"))
    d.add_done_callback(lambda _: (calls.append("second"), sys.exit(3)))
    d.add_done_callback(lambda _: calls.append("third"))
    with pytest.raises(interrupt) as caught:
        d.unref()
    assert caught.value.args == ()  # the first interrupt wins: destroy's, not sys.exit(3)
    assert d.done and d.wait(0) and calls == ["destroy", "first", "second", "third"]
    assert seen == []  # nothing reported as unraisable
    with pytest.raises(DestructorError):
        d.unref()  # fired exactly once
    late: list[str] = []

    def late_cb(_: object) -> None:
        late.append("late")
        raise interrupt()

    with pytest.raises(interrupt):
        d.add_done_callback(late_cb)  # runs at once, in this thread
    assert late == ["late"]


def test_done_callback_runs_at_once_when_already_done() -> None:
    d = FragDestructor(None)
    d.unref()
    got: list[FragDestructor] = []
    d.add_done_callback(got.append)
    assert got == [d]


def test_removed_callback_never_runs() -> None:
    d = FragDestructor(None)
    got: list[FragDestructor] = []
    d.add_done_callback(got.append)
    assert d.remove_done_callback(got.append)
    assert not d.remove_done_callback(got.append)
    d.unref()
    assert got == []


def test_wait_times_out_then_returns_true_once_fired_from_another_thread() -> None:
    d = FragDestructor(None)
    assert d.wait(0.01) is False
    t = threading.Timer(0.05, d.unref)
    t.start()
    assert d.wait(5) is True
    t.join()


def test_destroy_runs_in_the_thread_that_dropped_the_last_reference() -> None:
    where: list[str] = []
    d = FragDestructor(lambda _: where.append(threading.current_thread().name))
    t = threading.Thread(target=d.unref, name="dropper")
    t.start()
    t.join()
    assert where == ["dropper"]


def test_eight_threads_hammering_ref_unref_fire_destroy_exactly_once() -> None:
    calls: list[int] = []
    shared = [FragDestructor(lambda _, i=i: calls.append(i)) for i in range(4)]
    barrier = threading.Barrier(8)

    def hammer() -> None:
        barrier.wait()
        for _ in range(5_000):
            for d in shared:
                d.ref()
            for d in shared:
                d.unref()

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [d.refcount for d in shared] == [1, 1, 1, 1] and calls == []
    for d in shared:
        d.unref()
    assert sorted(calls) == [0, 1, 2, 3]


def test_concurrent_last_unrefs_fire_once() -> None:
    for _ in range(200):
        calls: list[None] = []
        d = FragDestructor(calls.append)
        for _ in range(7):
            d.ref()
        barrier = threading.Barrier(8)

        def drop(d: FragDestructor = d, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            d.unref()

        threads = [threading.Thread(target=drop) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert calls == [None]


def test_awaitable_from_asyncio_when_another_thread_fires_it() -> None:
    async def main() -> bool:
        d = FragDestructor(None)
        threading.Timer(0.05, d.unref).start()
        await asyncio.wait_for(d, 5)
        return d.done

    assert asyncio.run(main())


def test_await_on_a_done_destructor_returns_at_once() -> None:
    async def main() -> None:
        d = FragDestructor(None)
        d.unref()
        await d

    asyncio.run(main())


def test_cancelled_waiter_leaves_the_destructor_untouched() -> None:
    async def main() -> FragDestructor:
        d = FragDestructor(None)
        task = asyncio.ensure_future(_wait(d))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return d

    async def _wait(d: FragDestructor) -> None:
        await d

    d = asyncio.run(main())
    assert d.refcount == 1 and not d.done and d._callbacks == []
    d.unref()
    assert d.done
