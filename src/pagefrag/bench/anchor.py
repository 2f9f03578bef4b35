"""The C anchor: benchmarks/zc_anchor.c, compiled with the system compiler (``cc -O2``,
or ``$CC``) into a temporary folder at benchmark time. Without a compiler (or outside a
checkout, where the source is not installed) the C rows are left out and the report
says why."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[3] / "benchmarks" / "zc_anchor.c"


@contextmanager
def built(source: Path = SOURCE) -> Iterator[tuple[Path | None, str | None]]:
    """Compile ``source``; yields ``(binary, None)``, or ``(None, why)`` when it cannot
    be built. The binary is deleted on exit."""
    cc = os.environ.get("CC") or "cc"
    if not source.is_file():
        yield None, f"its source {source} is not here (run from a pagefrag checkout)"
        return
    if shutil.which(cc) is None:
        yield None, f"no C compiler ({cc}) found"
        return
    with tempfile.TemporaryDirectory(prefix="pagefrag-anchor-") as tmp:
        binary = Path(tmp) / "zc_anchor"
        out = subprocess.run(
            [cc, "-O2", "-o", str(binary), str(source)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if out.returncode != 0:
            lines = out.stderr.strip().splitlines() or [f"exit status {out.returncode}"]
            yield None, f"{cc} could not build {source.name}: {lines[-1]}"
        else:
            yield binary, None
