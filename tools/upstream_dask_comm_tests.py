#!/usr/bin/env python
"""Run dask.distributed's OWN comm tests (``distributed/comm/tests/``) against ``pagefrag://``.

Not part of CI, and nothing here is copied into pagefrag: the tests are read from a
distributed checkout (``--checkout DIR``) or from a bare git repository and a ref
(``--mirror GITDIR --ref REF``) into a temporary directory, changed there by the short
list of documented substitutions below (each must apply exactly as often as stated, or
the run stops: upstream changed and the table needs a look), and run with pytest. No
network is needed when the source is local.

The substitutions (``SUBSTITUTIONS``) make the generic tests run on ``pagefrag://``:

* every ``tcp://`` address in ``test_comms.py`` becomes ``pagefrag://``;
* the module's ``tcp`` fixture (which installs ``distributed.comm.tcp``'s backends and
  hands the module to the tests) installs ``PagefragBackend`` under ``pagefrag`` instead
  and hands the tests a stand-in module whose ``TCPListener``/``TCPConnector``/
  ``TCPBackend``/``TCP`` are pagefrag's ``PagefragListener``/``PagefragConnector``/
  ``PagefragBackend``/``PagefragComm`` (``TLS*`` stay distributed's);
* ``DASK_DISTRIBUTED__COMM__DEFAULT_SCHEME=pagefrag`` in the environment, so that
  ``resolve_address`` of a scheme-less address uses ``pagefrag://``.

Each run is repeated on both event loops (``distributed.admin.event-loop``) and with
``distributed.comm.pagefrag.zerocopy`` ``auto`` and ``always``: loopback copies at
delivery, so ``auto`` copies there, and only ``always`` keeps frames pinned until the
kernel delivers them, as a real NIC does. ``--src`` picks the pagefrag sources (e.g. an
older tree, to compare). ``PAGEFRAG_PURE_PYTHON`` is passed through.

Upstream's ``conftest.py`` is used verbatim and its pytest settings
(``[tool.pytest.ini_options]`` of its ``pyproject.toml``: ``filterwarnings = error``,
``--strict-markers`` ...) are kept, minus pytest-timeout's keys when that plugin is not
installed, plus an ignore for the FutureWarning of upstream's deprecated ``get_ipv6``
(their CI has no IPv6, so it never sees it). distributed's test certificates are read
from upstream too (module-level TLS contexts need them at import). Tests that cannot
apply to ``pagefrag://`` (TLS-only, inproc-only, tornado or ``distributed.comm.tcp``
internals, scheme-independent helpers, a scheme-less ``listen()`` that is hard-wired to
``tcp://``) are deselected by name with the reason in ``NOT_APPLICABLE``;
``test_ws.py`` (WebSocket only) is not collected; any test in neither table nor in
``APPLICABLE_HINT`` is run and reported as unclassified.

Example (from the repository root)::

    PYTHONPATH=$PWD/src .venv/bin/python tools/upstream_dask_comm_tests.py \\
        --mirror /path/to/distributed.git --ref 40fcd99a8   # or --checkout DIR

Exit status: 0 when no selected test failed, 1 otherwise, 2 for a usage or set-up error.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_DIR = "distributed/comm/tests"
TEST_FILES = ("test_comms.py", "test_tcp.py")
# Not collected at all: WebSocket only, and it imports test_comms as the package
# distributed.comm.tests, which the installed wheel does not have.
NOT_COLLECTED = {"test_ws.py": "WebSocket (ws://, wss://) only"}
# distributed's test TLS certificates (module-level TLS contexts in test_comms.py need
# them at import; the wheel does not ship them): read from upstream too.
CERTS = (
    "tls-ca-cert.pem",
    "tls-ca-key.pem",
    "tls-cert-chain.pem",
    "tls-cert.pem",
    "tls-key-cert.pem",
    "tls-key.pem",
    "tls-self-signed-cert.pem",
    "tls-self-signed-key.pem",
)


@dataclass(frozen=True)
class Substitution:
    old: str
    new: str
    count: int | None  # exact number of occurrences expected; None: at least one
    why: str


SUBSTITUTIONS: dict[str, tuple[Substitution, ...]] = {
    "test_comms.py": (
        Substitution(
            'params=["tornado"]',
            'params=["pagefrag"]',
            1,
            "the tcp fixture's single parameter names the backend it installs",
        ),
        Substitution(
            '    if request.param == "tornado":\n        import distributed.comm.tcp as tcp\n',
            '    if request.param == "pagefrag":\n        import _pagefrag_as_tcp as tcp\n',
            1,
            "the tcp fixture hands the tests pagefrag's classes under TCP's names",
        ),
        Substitution(
            'monkeypatch.setitem(backends, "tcp", tcp.TCPBackend())',
            'monkeypatch.setitem(backends, "pagefrag", tcp.TCPBackend())',
            1,
            "the tcp fixture installs a fresh PagefragBackend under its own scheme",
        ),
        Substitution("tcp://", "pagefrag://", None, "every tcp:// address is a pagefrag:// one"),
    ),
}

# The stand-in for ``distributed.comm.tcp`` that the patched ``tcp`` fixture returns.
SHIM = '''"""Written by tools/upstream_dask_comm_tests.py: pagefrag's classes under the names
distributed's comm tests use from distributed.comm.tcp."""
from distributed.comm.tcp import TLSBackend, TLSConnector, TLSListener, get_stream_address
from pagefrag.dask import PagefragBackend as TCPBackend
from pagefrag.dask import PagefragComm as TCP
from pagefrag.dask import PagefragConnector as TCPConnector
from pagefrag.dask import PagefragListener as TCPListener

__all__ = ["TCP", "TCPBackend", "TCPConnector", "TCPListener", "TLSBackend",
           "TLSConnector", "TLSListener", "get_stream_address"]
'''

_TLS = "TLS only (pagefrag:// is not encrypted; it refuses require_encryption)"
_INPROC = "inproc:// only (in-process queues, no sockets)"
_DEFAULT = (
    "scheme-less listen() is hard-wired to tcp:// (distributed.comm.core.listen ignores "
    "distributed.comm.default-scheme), so it tests TCP whatever the scheme"
)
_NOSCHEME = "address-string helper that involves no scheme or backend"

# file::function (parameters ignored) -> why it does not apply to pagefrag://
NOT_APPLICABLE: dict[str, str] = {
    "test_comms.py::test_parse_host_port": _NOSCHEME,
    "test_comms.py::test_unparse_host_port": _NOSCHEME,
    "test_comms.py::test_tls_specific": _TLS,
    "test_comms.py::test_tls_client_server_ipv4": _TLS,
    "test_comms.py::test_tls_client_server_ipv6": _TLS,
    "test_comms.py::test_tls_reject_certificate": _TLS,
    "test_comms.py::test_tls_comm_closed_implicit": _TLS,
    "test_comms.py::test_tls_comm_closed_explicit": _TLS,
    "test_comms.py::test_tls_repr": _TLS,
    "test_comms.py::test_tls_addresses": _TLS,
    "test_comms.py::test_inproc_specific_same_thread": _INPROC,
    "test_comms.py::test_inproc_specific_different_threads": _INPROC,
    "test_comms.py::test_inproc_continues_listening_after_handshake_error": _INPROC,
    "test_comms.py::test_inproc_handshakes_concurrently": _INPROC,
    "test_comms.py::test_inproc_client_server": _INPROC,
    "test_comms.py::test_inproc_comm_closed_implicit": _INPROC,
    "test_comms.py::test_inproc_comm_closed_explicit": _INPROC,
    "test_comms.py::test_inproc_comm_closed_explicit_2": _INPROC,
    "test_comms.py::test_inproc_connect_timeout": _INPROC,
    "test_comms.py::test_inproc_many_listeners": _INPROC,
    "test_comms.py::test_inproc_deserialize": _INPROC,
    "test_comms.py::test_inproc_deserialize_roundtrip": _INPROC,
    "test_comms.py::test_inproc_repr": _INPROC,
    "test_comms.py::test_inproc_addresses": _INPROC,
    "test_comms.py::test_default_client_server_ipv4": _DEFAULT,
    "test_comms.py::test_default_client_server_ipv6": _DEFAULT,
    "test_comms.py::test_share_buffer_with_header": (
        "distributed.comm.tcp internals: the TCP reader's buffer layout (header, small "
        "frames and the first uncompressed buffer read into one host array, the rule of "
        "tcp._add_frames_header); pagefrag's reader gives every frame a buffer of its own"
    ),
    "test_comms.py::test_comm_closed_on_write_error": (
        "tornado internals: replaces the TCP comm's IOStream.write (comm.stream)"
    ),
    "test_comms.py::test_retry_connect": (
        "distributed.comm.tcp internals: an UnreliableConnector plugged in through "
        "BaseTCPBackend._connector_class (not part of the Backend interface)"
    ),
    "test_comms.py::test_handshake_slow_comm": (
        "distributed.comm.tcp internals: a slow comm plugged in through "
        "BaseTCPConnector.comm_class and the TCP comm's constructor"
    ),
    "test_comms.py::test_stop_listener_during_handle_stream": (
        "tornado internals: wraps the TCP listener's tcp_server.handle_stream"
    ),
    "test_comms.py::test_get_stream_address_raises_if_closed": (
        "distributed.comm.tcp internals: get_stream_address of a tornado IOStream"
    ),
    "test_comms.py::test_register_backend_entrypoint": (
        "registry mechanics with a dummy 'udp' entry point; no comm of any scheme"
    ),
    "test_tcp.py::test_getaddrinfo_invalid_af": (
        "tornado internals: TCPConnector.client (tornado TCPClient) getaddrinfo"
    ),
}

# Written next to the tests and loaded with ``-p``: deselects NOT_APPLICABLE by name and
# records what was selected (upstream's conftest keeps its own hooks untouched).
SELECT_PLUGIN = '''"""Written by tools/upstream_dask_comm_tests.py."""
import json, os

import distributed.utils_test

# Where get_cert() looks for distributed's test certificates (copied from upstream).
distributed.utils_test.certs_dir = os.environ["PAGEFRAG_UPSTREAM_CERTS"]

_TABLE = json.loads(os.environ["PAGEFRAG_UPSTREAM_TABLE"])
_OUT = os.environ["PAGEFRAG_UPSTREAM_SELECTION"]


def _reason(item):
    file = item.path.name
    func = getattr(item, "originalname", None) or item.name.split("[")[0]
    return _TABLE.get(file + "::" + func) or _TABLE.get(file + "::*")


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        (drop if _reason(item) else keep).append(item)
    items[:] = keep
    if drop:
        config.hook.pytest_deselected(items=drop)
    with open(_OUT, "w") as f:
        json.dump({"selected": [i.nodeid for i in keep],
                   "deselected": [[i.nodeid, _reason(i)] for i in drop]}, f)
'''


def _git(gitdir: str, *args: str) -> str:
    return subprocess.run(
        ["git", "--git-dir", gitdir, *args], check=True, capture_output=True, text=True
    ).stdout


def fetch_sources(args: argparse.Namespace, dest: Path) -> str:
    """Write upstream's test files, conftest.py and pyproject.toml into ``dest``; return a
    description of the upstream revision."""
    names = [f"{TEST_DIR}/{n}" for n in TEST_FILES] + ["conftest.py", "pyproject.toml"]
    names += [f"distributed/tests/{c}" for c in CERTS]
    (dest / "certs").mkdir()

    def target(name: str) -> Path:
        return dest / ("certs" if name.endswith(".pem") else "") / Path(name).name

    if args.checkout:
        root = Path(args.checkout)
        for name in names:
            shutil.copyfile(root / name, target(name))
        try:
            rev = subprocess.run(
                ["git", "-C", str(root), "describe", "--tags", "--always", "--long"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            rev = "unknown (not a git checkout)"
        return f"checkout {root} at {rev}"
    commit = _git(args.mirror, "rev-parse", f"{args.ref}^{{commit}}").strip()
    for name in names:
        target(name).write_text(_git(args.mirror, "show", f"{commit}:{name}"))
    try:
        desc = _git(args.mirror, "describe", "--tags", "--long", commit).strip()
    except subprocess.CalledProcessError:
        desc = "no tag"
    return f"{args.ref} = {commit} ({desc})"


def apply_substitutions(dest: Path) -> list[str]:
    done = []
    for fname, subs in SUBSTITUTIONS.items():
        path = dest / fname
        text = path.read_text()
        for sub in subs:
            n = text.count(sub.old)
            if n == 0 or (sub.count is not None and n != sub.count):
                raise SystemExit(
                    f"{fname}: expected {sub.count or '>= 1'} of {sub.old!r}, found {n}: "
                    "upstream changed; review SUBSTITUTIONS"
                )
            text = text.replace(sub.old, sub.new)
            done.append(f"{fname}: {sub.old.strip()!r} -> {sub.new.strip()!r} ({n}x): {sub.why}")
        path.write_text(text)
    return done


def _toml_value(v: object) -> str:
    if isinstance(v, str):
        return "'''" + v + "'''" if "'''" not in v else json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, list):
        return "[\n" + "".join(f"  {_toml_value(x)},\n" for x in v) + "]"
    raise TypeError(v)


def write_pytest_config(dest: Path) -> list[str]:
    """Upstream's pytest settings as the temp dir's only config; returns what was changed."""
    with open(dest / "pyproject.toml", "rb") as f:
        ini = tomllib.load(f)["tool"]["pytest"]["ini_options"]
    dropped = []
    if importlib.util.find_spec("pytest_timeout") is None:
        for key in ("timeout", "timeout_method"):
            if ini.pop(key, None) is not None:
                dropped.append(f"{key} removed (pytest-timeout is not installed)")
    # Upstream's own rot: requires_ipv6 tests call the deprecated get_ipv6(), whose
    # FutureWarning filterwarnings=error turns into a failure (upstream's CI has no IPv6
    # and skips them). Ignored here so those tests test the comm.
    ini.setdefault("filterwarnings", []).append("ignore:get_ipv6 is deprecated:FutureWarning")
    dropped.append("filterwarnings += 'ignore:get_ipv6 is deprecated:FutureWarning'")
    lines = ["[tool.pytest.ini_options]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in ini.items()]
    (dest / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return dropped


def run_pytest(dest: Path, loop: str, zerocopy: str, args: argparse.Namespace) -> dict[str, object]:
    tag = f"{loop}-{zerocopy}"
    junit = dest / f"junit-{tag}.xml"
    selection = dest / f"selection-{tag}.json"
    env = dict(os.environ)
    # The temp dir (the stand-in module, the plugin), then this checkout's sources.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(dest), args.src, env.get("PYTHONPATH", "")) if p
    )
    env["DASK_DISTRIBUTED__COMM__DEFAULT_SCHEME"] = "pagefrag"
    env["DASK_DISTRIBUTED__ADMIN__EVENT_LOOP"] = loop
    env["DASK_DISTRIBUTED__COMM__PAGEFRAG__ZEROCOPY"] = zerocopy
    env["PAGEFRAG_UPSTREAM_TABLE"] = json.dumps(NOT_APPLICABLE)
    env["PAGEFRAG_UPSTREAM_SELECTION"] = str(selection)
    env["PAGEFRAG_UPSTREAM_CERTS"] = str(dest / "certs")
    cmd = [
        args.python,
        "-m",
        "pytest",
        "-p",
        "_pagefrag_select",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        "--color=no",
        *TEST_FILES,
        *args.pytest_args,
    ]
    print(f"\n== loop={loop} zerocopy={zerocopy}: {' '.join(cmd)} (in {dest})", flush=True)
    proc = subprocess.run(cmd, cwd=dest, env=env)
    results: dict[str, str] = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = "failed"
                elif child.tag == "skipped":
                    outcome = "skipped"
            results[name] = outcome
    sel = json.loads(selection.read_text()) if selection.exists() else {}
    return {"rc": proc.returncode, "results": results, "selection": sel}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkout", help="a distributed source checkout")
    src.add_argument("--mirror", help="a (bare) git repository of distributed")
    ap.add_argument("--ref", default="HEAD", help="with --mirror: tag, branch or commit")
    ap.add_argument(
        "--loop",
        choices=("asyncio", "uvloop", "both"),
        default="both",
        help="distributed.admin.event-loop for the run(s)",
    )
    ap.add_argument(
        "--zerocopy",
        choices=("auto", "always", "never", "both"),
        default="both",
        help="distributed.comm.pagefrag.zerocopy; both = auto and always (loopback copies "
        "at delivery, so auto copies here: always keeps frames pinned until delivered)",
    )
    ap.add_argument("--python", default=sys.executable, help="the interpreter to test with")
    ap.add_argument("--src", default=str(REPO / "src"), help="the pagefrag sources to test")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = ap.parse_args()

    dest = Path(tempfile.mkdtemp(prefix="pagefrag-upstream-comm-"))
    try:
        rev = fetch_sources(args, dest)
        subs = apply_substitutions(dest)
        dropped = write_pytest_config(dest)
        (dest / "_pagefrag_as_tcp.py").write_text(SHIM)
        (dest / "_pagefrag_select.py").write_text(SELECT_PLUGIN)
        loops = ("asyncio", "uvloop") if args.loop == "both" else (args.loop,)
        modes = ("auto", "always") if args.zerocopy == "both" else (args.zerocopy,)
        runs = {
            f"loop={loop} zerocopy={mode}": run_pytest(dest, loop, mode, args)
            for loop in loops
            for mode in modes
        }
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"set-up failed: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"kept {dest}")
        else:
            shutil.rmtree(dest, ignore_errors=True)

    print("\n== distributed's own comm tests against pagefrag://")
    print(f"upstream: {rev}")
    print(f"pagefrag sources: {args.src}")
    print("substitutions:")
    for s in subs:
        print(f"  {s}")
    for d in dropped:
        print(f"  upstream pytest settings: {d}")
    first = next(iter(runs.values()))["selection"]
    assert isinstance(first, dict)
    print("not applicable (deselected):")
    seen: dict[str, str] = {}
    for nodeid, reason in first.get("deselected", []):
        seen.setdefault(re.sub(r"\[.*\]$", "", nodeid), reason)
    for name, reason in sorted(seen.items()):
        print(f"  {name}: {reason}")
    for name, reason in NOT_COLLECTED.items():
        print(f"  {name} (whole file, not collected): {reason}")
    unclassified = [
        n
        for n in first.get("selected", [])
        if n.split("[")[0].split("::")[-1] not in APPLICABLE_HINT
    ]
    failed_any = False
    for label, run in runs.items():
        results = run["results"]
        assert isinstance(results, dict)
        counts = {
            k: sum(1 for v in results.values() if v == k) for k in ("passed", "failed", "skipped")
        }
        print(
            f"{label}: selected {len(results)}: {counts['passed']} passed, "
            f"{counts['failed']} failed, {counts['skipped']} skipped "
            f"(pytest exit status {run['rc']})"
        )
        for name, outcome in sorted(results.items()):
            if outcome != "passed":
                print(f"  {outcome}: {name}")
        failed_any = failed_any or counts["failed"] > 0 or run["rc"] not in (0, 5)
    if unclassified:
        print("unclassified (in neither table; run):")
        for n in unclassified:
            print(f"  {n}")
    return 1 if failed_any else 0


# The tests expected to apply (after the substitutions); anything collected, not
# deselected and not named here is reported as unclassified.
APPLICABLE_HINT = (
    "test_get_address_host",
    "test_resolve_address",
    "test_get_local_address_for",
    "test_tcp_listener_does_not_call_handler_on_handshake_error",
    "test_tcp_specific",
    "test_comm_failure_threading",
    "test_default_client_server_ipv4",
    "test_default_client_server_ipv6",
    "test_tcp_client_server_ipv4",
    "test_tcp_client_server_ipv6",
    "test_tcp_comm_closed_implicit",
    "test_tcp_comm_closed_explicit",
    "test_comm_closed_on_read_error",
    "test_tcp_connect_timeout",
    "test_tcp_many_listeners",
    "test_tcp_deserialize",
    "test_tcp_deserialize_roundtrip",
    "test_tcp_deserialize_eoferror",
    "test_tcp_repr",
    "test_tcp_addresses",
    "test_do_not_share_buffers",
    "test_share_buffer_with_header",
)

if __name__ == "__main__":
    sys.exit(main())
