"""The ``pagefrag`` command line: one module per subcommand, each with
``add_parser(subparsers)`` and ``run(args) -> int``.

Exit status: 0 success, 1 a failed run (integrity, an OS error), 2 bad input (one line
on stderr, before anything runs), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
Interrupted or terminated, the namespaces a run built are deleted first.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from ..errors import PageFragError
from ..testing.netlab import sigterm_exits
from . import bench, demo, repro, trace
from ._args import UsageError

INTERRUPTED, TERMINATED = 130, 143


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line: the usage text would bury the reason.
        self.exit(2, f"{self.prog}: error: {message}\n")


_COMMANDS = (demo, bench, trace, repro)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pagefrag",
        description="Know when the network stack is really finished with your memory.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    name = f"pagefrag {args.command}"
    try:
        # SIGTERM raises SystemExit(143) here, so the run's with-blocks (namespaces) clean up.
        with sigterm_exits():
            code: int = args.run(args)
    except UsageError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError, PageFragError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except SystemExit as exc:
        if exc.code != TERMINATED:
            raise
        print(f"{name}: terminated", file=sys.stderr)
        return TERMINATED
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
