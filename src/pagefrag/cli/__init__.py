"""The ``pagefrag`` command line: one module per subcommand, each with
``add_parser(subparsers)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import PageFragError
from . import bench, demo, repro, trace

_COMMANDS = (demo, bench, trace, repro)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    try:
        code: int = args.run(args)
    except (OSError, ValueError, PageFragError) as exc:
        print(f"pagefrag {args.command}: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
