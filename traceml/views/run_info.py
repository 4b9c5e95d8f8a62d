"""Run information: StoreView -> the header, metadata, environment, rank and integrity panels
as display strings (:class:`RunInfo`).  Pure."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from traceml.store import StoreView
from traceml.views.measures import run_duration_s
from traceml.views.select import origin_ns
from traceml.views.stepsources import step_source


@dataclass(frozen=True)
class RunInfo:
    """Run metadata, environment, rank states and integrity, as display strings."""

    title: str
    meta: tuple[tuple[str, str], ...]
    ranks: tuple[tuple[str, ...], ...]  # rows: rank, host, state, exit, steps, dropped
    environment: tuple[tuple[str, str], ...]
    integrity: tuple[tuple[str, str], ...]
    integrity_status: str  # "live" | "complete" | "recovered" | "damaged"
    origin_ns: int
    extra: Mapping[str, Any] = field(default_factory=dict)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _fmt_ns(ns: int) -> str:
    import datetime as _dt

    if ns <= 0:
        return "-"
    return _dt.datetime.fromtimestamp(ns / 1e9, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def run_info(view: StoreView) -> RunInfo:
    """Everything the header, metadata, environment and integrity panels show."""
    meta = dict(view.meta)
    title = str(meta.get("run_name") or meta.get("name") or meta.get("run_id") or "traceml run")
    rows: list[tuple[str, str]] = []
    for key in sorted(meta):
        value = meta[key]
        rows.append((key, _fmt_ns(value) if key.endswith("_ns") and isinstance(value, int) else _fmt(value)))
    steps = step_source(view)
    sr = steps.span()
    if sr is not None:
        rows.append(("steps", f"{sr[0]} .. {sr[1]}"))
    t0 = origin_ns(view)
    latest = steps.latest_ns()
    duration = run_duration_s(view)
    if math.isfinite(duration):
        rows.append(("duration", f"{duration:.1f} s"))
    elif latest and t0:
        rows.append(("duration", f"{(latest - t0) / 1e9:.1f} s"))
    ranks = []
    for r in view.ranks:
        info = view.rank_info.get(r)
        ranks.append(
            (
                str(r),
                info.host if info and info.host else "-",
                info.state if info else "unknown",
                info.exit_status if info and info.exit_status else "-",
                str(steps.count(r)),
                str(view.dropped(r)),
            )
        )
    env_rows: list[tuple[str, str]] = []
    envs = sorted(k for k in view.attachments if k.startswith("environment/"))
    if envs:
        env = view.attachments[envs[0]]
        if isinstance(env, Mapping):
            env_rows = [(str(k), _fmt(v)) for k, v in sorted(env.items(), key=lambda kv: str(kv[0]))]
        if len(envs) > 1:
            env_rows.append(("(from)", f"{envs[0]} of {len(envs)} environment attachments"))
    integ = view.integrity
    if integ is None:
        status = "live"
        integ_rows = [("status", "live (no file yet)")]
    else:
        status = str(integ.get("status", "unknown"))
        integ_rows = [(str(k), _fmt(v)) for k, v in sorted(integ.items(), key=lambda kv: str(kv[0]))]
    evicted = sum(view.evicted.values())
    if evicted:
        integ_rows.append(("evicted from live window", f"{evicted} rows"))
    dropped = view.dropped()
    if dropped:
        integ_rows.append(("dropped on ranks", f"{dropped} rows"))
    return RunInfo(title, tuple(rows), tuple(ranks), tuple(env_rows), tuple(integ_rows), status, t0)
