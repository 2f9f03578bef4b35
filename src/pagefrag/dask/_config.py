"""The ``distributed.comm.pagefrag.*`` settings of Dask's configuration (``dask.config``:
YAML files, ``DASK_DISTRIBUTED__COMM__PAGEFRAG__HIGH_WATER=...`` environment variables,
``dask.config.set``), their defaults, and their checking: a bad value raises
``ValueError`` naming the key when a comm or listener is made, before any socket is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask.config
from dask.utils import parse_bytes, parse_timedelta

__all__ = ["DEFAULTS", "TCP_PROBES", "Settings", "settings"]

DEFAULTS: dict[str, Any] = {
    "backend": "auto",  # the kernel bridge: auto, msg_zerocopy, uring
    "zerocopy": "auto",  # the policy: auto, always, never
    "min-zerocopy-size": None,  # frames below it are joined (copied); None: the policy's
    "high-water": "64 MiB",  # unsent + pinned bytes above which write() waits
    "read-high-water": "64 MiB",  # received, unread bytes above which reading pauses
    "max-frames": 1 << 20,  # bounds of one received message: never trust the network
    "max-message-size": "64 GiB",
    "wait-for-release": True,  # write() returns once the kernel released the frames
    "linger": "10 s",  # how long close() waits for the kernel's completions
}
_KEY = "distributed.comm.pagefrag"
TCP_PROBES = 10  # keep-alive probes before a silent peer is given up (as distributed's)

dask.config.update_defaults({"distributed": {"comm": {"pagefrag": DEFAULTS}}})


@dataclass(frozen=True)
class Settings:
    """One read of the settings, checked."""

    backend: str
    zerocopy: str
    min_zerocopy_size: int | None
    high_water: int
    read_high_water: int
    max_frames: int
    max_message_size: int
    wait_for_release: bool
    linger: float
    tcp_timeout: int  # distributed.comm.timeouts.tcp, whole seconds


def _bytes(name: str, value: Any) -> int:
    try:
        n = parse_bytes(value) if isinstance(value, str) else int(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{_KEY}.{name}: not a byte count: {value!r}") from exc
    if n < 0 or isinstance(value, bool):
        raise ValueError(f"{_KEY}.{name}: not a byte count: {value!r}")
    return n


def settings() -> Settings:
    """The current settings (read from ``dask.config`` now), checked: ``ValueError``
    naming the key for a bad one."""
    raw = {name: dask.config.get(f"{_KEY}.{name}", default) for name, default in DEFAULTS.items()}
    for name, allowed in (
        ("backend", ("auto", "msg_zerocopy", "uring")),
        ("zerocopy", ("auto", "always", "never")),
    ):
        if raw[name] not in allowed:
            raise ValueError(f"{_KEY}.{name} must be one of {allowed}, not {raw[name]!r}")
    min_size = raw["min-zerocopy-size"]
    if not isinstance(raw["wait-for-release"], bool):
        raise ValueError(f"{_KEY}.wait-for-release must be true or false")
    try:
        linger = parse_timedelta(raw["linger"], default="seconds")
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"{_KEY}.linger: not a duration: {raw['linger']!r}") from exc
    if linger is None or not linger >= 0:
        raise ValueError(f"{_KEY}.linger must be >= 0 seconds, not {raw['linger']!r}")
    try:
        tcp_timeout = int(parse_timedelta(dask.config.get("distributed.comm.timeouts.tcp"), "s"))
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"distributed.comm.timeouts.tcp: not a duration: {exc}") from exc
    if tcp_timeout < TCP_PROBES + 1:
        raise ValueError(f"distributed.comm.timeouts.tcp must be >= {TCP_PROBES + 1} s")
    max_frames = raw["max-frames"]
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise ValueError(f"{_KEY}.max-frames must be a positive integer, not {max_frames!r}")
    return Settings(
        backend=raw["backend"],
        zerocopy=raw["zerocopy"],
        min_zerocopy_size=None if min_size is None else _bytes("min-zerocopy-size", min_size),
        high_water=_bytes("high-water", raw["high-water"]),
        read_high_water=_bytes("read-high-water", raw["read-high-water"]),
        max_frames=max_frames,
        max_message_size=_bytes("max-message-size", raw["max-message-size"]),
        wait_for_release=raw["wait-for-release"],
        linger=float(linger),
        tcp_timeout=tcp_timeout,
    )
