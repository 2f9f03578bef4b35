"""Helpers shared by both FragDestructor implementations (pure-Python and compiled):
reporting an exception nobody can catch, and awaiting a destructor from any loop."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Generator
from typing import Any

__all__ = ["await_done", "report_unraisable"]


def _unraisable_args_type() -> Any:
    # sys.unraisablehook only accepts the interpreter's own UnraisableHookArgs type,
    # which has no public name: catch one instance to learn it.
    seen: list[Any] = []
    old = sys.unraisablehook
    sys.unraisablehook = seen.append

    class _Probe:
        def __del__(self) -> None:
            raise RuntimeError("probe")

    try:
        _Probe()
    finally:
        sys.unraisablehook = old
    return type(seen[0])


_UnraisableHookArgs = _unraisable_args_type()


def report_unraisable(exc: BaseException, msg: str, obj: object) -> None:
    """Hand an exception nobody can catch to ``sys.unraisablehook``."""
    sys.unraisablehook(_UnraisableHookArgs((type(exc), exc, exc.__traceback__, msg, obj)))


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def await_done(d: Any) -> Generator[Any, None, None]:
    """``d.__await__()``: wait on the running loop until ``d`` (a FragDestructor of
    either implementation) has fired, whichever thread fires it."""
    if d.done:
        return
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    loop = fut.get_loop()

    def wake(_: object) -> None:
        # A closed loop has nobody waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve, fut)

    d.add_done_callback(wake)
    try:
        yield from fut.__await__()
    finally:
        # A cancelled waiter leaves nothing behind; the destructor is untouched.
        d.remove_done_callback(wake)
