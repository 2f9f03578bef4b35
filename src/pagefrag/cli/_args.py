"""Checks shared by the subcommands: bad input is refused before anything runs."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path


class UsageError(ValueError):
    """Bad command-line input found after parsing (options that do not fit together)."""


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: an integer in ``lo..hi``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, not {value}")
        return value

    return parse


def names_in(known: tuple[str, ...] | list[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated, non-empty subset of ``known``."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in known]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"{', '.join(bad) or 'nothing'}: choose from {', '.join(known)}"
            )
        return names

    return parse


def seconds_up_to(hi: float) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds, more than 0 and at most ``hi``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (math.isfinite(value) and 0 < value <= hi):
            raise argparse.ArgumentTypeError(f"must be more than 0 and at most {hi:g}, not {text}")
        return value

    return parse


def writable_folder(path: Path, option: str) -> None:
    """``path`` is a folder that exists or can be created, and can be written; create it.
    ``UsageError`` otherwise (before a long run whose results would be lost)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot create it ({exc.strerror})") from None
    probe = path / f".pagefrag-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write there ({exc.strerror})") from None


def writable_file(path: Path, option: str) -> None:
    """``path`` can be written as a file (its folder is checked and created)."""
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder")
    writable_folder(path.parent if str(path.parent) else Path("."), option)
