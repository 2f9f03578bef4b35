"""Run CPython's own asyncio stream and server tests, optionally with pagefrag.aio patched
in, and write each test's outcome to a JSON file (used by tests/test_aio_cpython.py).

    python tests/cpython_streams.py {asyncio,uvloop} {plain,patched} OUT.json

``patched``: ``asyncio.open_connection`` and ``asyncio.start_server`` are pagefrag.aio's
for the whole run. ``uvloop``: every loop the tests create is a uvloop loop (the stream
tests take theirs from the policy; the server tests name ``SelectorEventLoop``, so their
``new_loop`` is replaced). Runs in a process of its own: the tests change asyncio's
global policy and the patch must not leak into the caller.
"""

from __future__ import annotations

import asyncio
import json
import sys
import unittest
from typing import Any

MODULES = ("test.test_asyncio.test_streams", "test.test_asyncio.test_server")


class Outcomes(unittest.TestResult):
    """Each test's id mapped to "pass", "fail", "error" or "skip" (with the reason)."""

    def __init__(self) -> None:
        super().__init__()
        self.outcomes: dict[str, list[str]] = {}

    def addSuccess(self, test: unittest.TestCase) -> None:
        self.outcomes[test.id()] = ["pass", ""]

    def addFailure(self, test: unittest.TestCase, err: Any) -> None:
        self.outcomes[test.id()] = ["fail", self._exc_info_to_string(err, test)]

    def addError(self, test: unittest.TestCase, err: Any) -> None:
        # setUpModule/tearDownModule errors come with a _ErrorHolder, not a test case
        self.outcomes[test.id()] = ["error", self._exc_info_to_string(err, test)]

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        self.outcomes[test.id()] = ["skip", reason]

    def addExpectedFailure(self, test: unittest.TestCase, err: Any) -> None:
        self.outcomes[test.id()] = ["skip", "expected failure"]

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        self.outcomes[test.id()] = ["fail", "unexpected success"]


def _close_uvloop(loop: asyncio.AbstractEventLoop) -> None:
    if not loop.is_closed():
        loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()


def main(loop: str, mode: str, out: str) -> None:
    suite = unittest.defaultTestLoader.loadTestsFromNames(MODULES)
    if loop == "uvloop":
        import uvloop
        from test.test_asyncio import test_server
        from test.test_asyncio import utils as test_utils

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        # The harness's close_loop reads a private attribute of asyncio's loops that
        # uvloop's lack (_default_executor): close uvloop's the public way.
        test_utils.TestCase.close_loop = staticmethod(_close_uvloop)  # type: ignore[method-assign]
        test_server.SelectorStartServerTests.new_loop = (  # type: ignore[method-assign]
            lambda self: uvloop.new_event_loop()
        )
        # test_streams' tearDownModule resets the policy: the server tests run after it
        # and make their loops themselves.
    if mode == "patched":
        from pagefrag import aio

        asyncio.open_connection = aio.open_connection  # type: ignore[assignment]
        asyncio.start_server = aio.start_server  # type: ignore[assignment]
        asyncio.streams.open_connection = aio.open_connection  # type: ignore[assignment]
        asyncio.streams.start_server = aio.start_server  # type: ignore[assignment]
    result = Outcomes()
    suite.run(result)
    with open(out, "w") as f:
        json.dump(result.outcomes, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
