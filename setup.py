"""Build the optional compiled core, pagefrag._speedups (Cython).

If it cannot be built (no compiler, no Python headers), the install goes on with the
pure-Python core and says so once, as aiohttp and yarl do; ``PAGEFRAG_PURE_PYTHON=1`` in
the environment skips the build. Everything else is in pyproject.toml.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that falls back to the pure-Python core instead of failing."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # any build failure means: the pure core
            self._fallback(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._fallback(exc)

    _warned = False

    def _fallback(self, exc: BaseException) -> None:
        if not OptionalBuildExt._warned:
            OptionalBuildExt._warned = True
            print(
                "WARNING: pagefrag: the compiled core (pagefrag._speedups) could not be "
                f"built ({exc}); installing the pure-Python core",
                file=sys.stderr,
            )


def extensions() -> list[Extension]:
    if os.environ.get("PAGEFRAG_PURE_PYTHON", "") not in ("", "0"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print(
            "WARNING: pagefrag: Cython is not available; installing the pure-Python core",
            file=sys.stderr,
        )
        return []
    return cythonize(
        [Extension("pagefrag._speedups", ["src/pagefrag/_speedups.pyx"], optional=True)],
        compiler_directives={"language_level": "3"},
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
