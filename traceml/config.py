"""Environment variables: the only way configuration reaches the ranks.

``traceml run`` sets these for torchrun's children; a script run with plain
``python`` may set ``TRACEML_OUT`` to record its own ``.tml``.  Leaf module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from traceml.errors import ConfigError

ENV_AGGREGATOR_HOST = "TRACEML_AGGREGATOR_HOST"
ENV_AGGREGATOR_PORT = "TRACEML_AGGREGATOR_PORT"
ENV_TOKEN = "TRACEML_TOKEN"
ENV_RUN_ID = "TRACEML_RUN_ID"
ENV_INTERVAL = "TRACEML_INTERVAL"
ENV_OUT = "TRACEML_OUT"
ENV_DISABLED = "TRACEML_DISABLED"
ENV_NO_AUTO_INTEGRATIONS = "TRACEML_NO_AUTO_INTEGRATIONS"
#: turns off zero-code steps (steps cut at ``optimizer.step()`` in a script without ``trace_step``)
ENV_NO_AUTO_STEPS = "TRACEML_NO_AUTO_STEPS"
#: samples per second of the training thread's stack (explains the residual); 0 turns it off
ENV_STACK_HZ = "TRACEML_STACK_HZ"
DEFAULT_STACK_HZ = 67.0
ENV_MAX_FRAME_MB = "TRACEML_MAX_FRAME_MB"
#: the decode budget of a frame: objects (containers, items, keys) per KiB of its bytes
ENV_MAX_OBJECTS_PER_KIB = "TRACEML_MAX_OBJECTS_PER_KIB"
#: the dashboards: a plotly.js bundle to serve instead of plotly's full one (e.g. the
#: ``plotly.js-cartesian-dist-min`` build, a third of the size: a faster first page)
ENV_PLOTLY_JS = "TRACEML_PLOTLY_JS"
#: the terminal live view shows only these ranks (``0-15,300``) in its rank table
ENV_RANKS = "TRACEML_RANKS"

DEFAULT_INTERVAL_S = 1.0
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
#: one decoded object per 16 frame bytes (plus DECODE_BASE_OBJECTS): a batch of columns is far
#: below it (its numbers travel as bytes), a frame of empty arrays or tiny strings far above
DEFAULT_MAX_OBJECTS_PER_KIB = 64
#: objects every frame may decode to, whatever its size (a hello, a small attachment)
DECODE_BASE_OBJECTS = 16384


@dataclass(frozen=True)
class RankConfig:
    """What a rank reads from its environment at ``traceml.init``."""

    aggregator_host: str | None = None
    aggregator_port: int | None = None
    token: str = ""
    run_id: str = ""
    interval_s: float = DEFAULT_INTERVAL_S
    out: str | None = None
    disabled: bool = False
    auto_integrations: bool = True
    #: False when ``TRACEML_NO_AUTO_STEPS`` turns zero-code steps off
    auto_steps: bool = True
    #: stack samples per second while a step is open (``TRACEML_STACK_HZ``; 0 = off)
    stack_hz: float = DEFAULT_STACK_HZ
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES

    @property
    def streaming(self) -> bool:
        return self.aggregator_host is not None and self.aggregator_port is not None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r}: expected a number of seconds, e.g. {name}=1.0") from exc
    if value <= 0:
        raise ConfigError(f"{name}={raw!r}: expected a positive number of seconds")
    return value


def _truthy(raw: str | None) -> bool:
    return (raw or "").strip().lower() in ("1", "true", "yes", "on")


def _stack_hz(env: Mapping[str, str]) -> float:
    raw = env.get(ENV_STACK_HZ)
    if raw is None or raw.strip() == "":
        return DEFAULT_STACK_HZ
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(
            f"{ENV_STACK_HZ}={raw!r}: expected samples per second, e.g. {ENV_STACK_HZ}=67 (0: off)"
        ) from exc
    if not 0 <= value <= 1000:
        raise ConfigError(f"{ENV_STACK_HZ}={raw!r}: expected 0 (off) to 1000 samples per second")
    return value


def rank_config_from_env(env: Mapping[str, str] | None = None) -> RankConfig:
    env = os.environ if env is None else env
    port_raw = env.get(ENV_AGGREGATOR_PORT)
    port: int | None = None
    if port_raw:
        try:
            port = int(port_raw)
        except ValueError as exc:
            raise ConfigError(f"{ENV_AGGREGATOR_PORT}={port_raw!r}: expected a TCP port number") from exc
        if not 0 < port < 65536:
            raise ConfigError(f"{ENV_AGGREGATOR_PORT}={port_raw!r}: expected a port in 1..65535")
    host = env.get(ENV_AGGREGATOR_HOST) or ("127.0.0.1" if port is not None else None)
    max_frame_mb = _float(env, ENV_MAX_FRAME_MB, DEFAULT_MAX_FRAME_BYTES / 1024 / 1024)
    return RankConfig(
        aggregator_host=host,
        aggregator_port=port,
        token=env.get(ENV_TOKEN, ""),
        run_id=env.get(ENV_RUN_ID, ""),
        interval_s=_float(env, ENV_INTERVAL, DEFAULT_INTERVAL_S),
        out=env.get(ENV_OUT) or None,
        disabled=_truthy(env.get(ENV_DISABLED)),
        auto_integrations=not _truthy(env.get(ENV_NO_AUTO_INTEGRATIONS)),
        auto_steps=not _truthy(env.get(ENV_NO_AUTO_STEPS)),
        stack_hz=_stack_hz(env),
        max_frame_bytes=int(max_frame_mb * 1024 * 1024),
    )


def max_objects_per_kib_from_env(env: Mapping[str, str] | None = None) -> int:
    """The frame decode budget (``TRACEML_MAX_OBJECTS_PER_KIB``, default 64 objects per KiB)."""
    env = os.environ if env is None else env
    raw = env.get(ENV_MAX_OBJECTS_PER_KIB)
    if raw is None or raw.strip() == "":
        return DEFAULT_MAX_OBJECTS_PER_KIB
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(
            f"{ENV_MAX_OBJECTS_PER_KIB}={raw!r}: expected a whole number of objects per KiB, e.g. 64"
        ) from exc
    if not 1 <= value <= 1024:
        raise ConfigError(f"{ENV_MAX_OBJECTS_PER_KIB}={raw!r}: expected 1..1024 objects per KiB (default 64)")
    return value
