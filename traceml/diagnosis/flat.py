"""The run summary as flat metric keys: ``flatten_summary(summary) -> {"traceml/<section>/...": number}``.

Every value a finite number, every key ``traceml/`` + at most four parts of ``[A-Za-z0-9_.-]`` (recording
names reduced and bounded), so it fits ``wandb``/``mlflow`` as is.  Pure.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

#: phases of a step, in display order ("step" is the whole step); mirrors diagnosis.summary
_PHASES = ("step", "dataloader", "h2d", "forward", "backward", "optimizer", "residual")
PREFIX = "traceml"
#: at most this many "/" in a key (wandb and mlflow take more; dashboards read better with fewer)
MAX_SEPARATORS = 4
#: a name part taken from a recording is cut to this many characters
MAX_PART_CHARS = 64
#: per-rank keys are written for at most this many ranks (the job-wide keys cover the rest)
MAX_RANKS = 256
#: user regions named at most
MAX_REGIONS = 64
SEVERITY_LEVEL = {"info": 0, "warn": 1, "critical": 2}

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")

Flat = dict[str, float | int]


def safe_part(name: object) -> str:
    """A recording's name as one key part: ``[A-Za-z0-9_.-]``, at most :data:`MAX_PART_CHARS`, never empty."""
    text = _UNSAFE.sub("_", str(name)).strip("._") or "_"
    return text[:MAX_PART_CHARS]


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return None


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else []


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _items(summary: Mapping[str, Any]) -> Iterator[tuple[tuple[str, ...], Any]]:
    run = _map(summary.get("run"))
    for key in ("duration_s", "world_size", "exit_code"):
        yield ("run", key), run.get(key)
    if isinstance(run.get("exit_status"), str):
        yield ("run", "ok"), run["exit_status"] == "ok"

    steps = _map(summary.get("steps"))
    for key in ("count", "warmup_steps", "failed_rows", "throughput_steps_per_s"):
        yield ("steps", key), steps.get(key)
    overall = _map(steps.get("overall"))
    step_median = _number(_map(overall.get("step")).get("median_ms"))
    for phase in _PHASES:
        stats = _map(overall.get(phase))
        yield ("steps", phase, "median_ms"), stats.get("median_ms")
        yield ("steps", phase, "p95_ms"), stats.get("p95_ms")
        median = _number(stats.get("median_ms"))
        if phase != "step" and median is not None and step_median:
            # the phase's share of the median step (medians: shares need not add up to 1)
            yield ("steps", phase, "share"), median / step_median
    for row in _list(steps.get("per_rank"))[:MAX_RANKS]:
        rank = _int(_map(row).get("rank"))
        if rank is None:
            continue
        phases = _map(_map(row).get("phases"))
        for phase in _PHASES:
            stats = _map(phases.get(phase))
            yield (f"rank{rank}", phase, "median_ms"), stats.get("median_ms")
            if phase == "step":
                yield (f"rank{rank}", phase, "p95_ms"), stats.get("p95_ms")
        yield (f"rank{rank}", "steps"), _map(row).get("count")

    own = _map(summary.get("traceml"))  # what traceml itself cost the run
    for key in ("overhead_us_per_step", "overhead_share"):
        yield ("traceml", key), own.get(key)

    seen: set[str] = set()
    for region in _list(summary.get("regions"))[:MAX_REGIONS]:
        region = _map(region)
        name = safe_part(region.get("name", ""))
        base, n = name, 1
        while name in seen:  # two names may reduce to the same part
            n += 1
            name = f"{base[: MAX_PART_CHARS - 4]}_{n}"
        seen.add(name)
        for key in ("median_ms", "p95_ms", "calls"):
            yield ("regions", name, key), region.get(key)

    yield from _diagnosis_items(_map(summary.get("diagnosis")), "diagnosis")
    recent = _map(summary.get("diagnosis_recent"))
    if recent:
        yield from _diagnosis_items(recent, "diagnosis_recent")

    memory = _map(summary.get("memory"))
    for key in ("peak_rss_bytes", "peak_gpu_alloc_bytes", "peak_gpu_reserved_bytes", "gpu_total_bytes"):
        yield ("memory", key), memory.get(key)
    for row in _list(memory.get("per_rank"))[:MAX_RANKS]:
        rank = _int(_map(row).get("rank"))
        if rank is not None:
            for key in ("peak_rss_bytes", "peak_gpu_alloc_bytes", "peak_gpu_reserved_bytes"):
                yield (f"rank{rank}", "memory", key), _map(row).get(key)

    system = _map(summary.get("system"))
    for row in _list(system.get("nodes"))[:MAX_RANKS]:
        node = _int(_map(row).get("node_rank"))
        if node is not None:
            for key in ("cpu_pct_mean", "cpu_pct_max", "ram_used_max_bytes", "ram_total_bytes"):
                yield ("system", f"node{node}", key), _map(row).get(key)
    for row in _list(system.get("gpus"))[:MAX_RANKS]:
        node, idx = _int(_map(row).get("node_rank")), _int(_map(row).get("gpu_idx"))
        if node is not None and idx is not None:
            for key in ("util_pct_mean", "util_pct_p95", "mem_used_max_bytes", "mem_total_bytes", "temp_c_max"):
                yield ("gpu", f"node{node}_gpu{idx}", key), _map(row).get(key)
            yield ("gpu", f"node{node}_gpu{idx}", "power_w_mean"), _map(row).get("power_w_mean")

    integrity = _map(summary.get("integrity"))
    yield ("integrity", "complete"), integrity.get("complete")
    lost = _map(integrity.get("lost"))
    for key in ("bytes", "rows_dropped", "rows_evicted", "skipped_records", "failed_step_rows"):
        yield ("integrity", f"lost_{key}"), lost.get(key)
    yield ("integrity", "ranks_died"), len(_list(lost.get("ranks_died")))


def _diagnosis_items(diag: Mapping[str, Any], section: str) -> Iterator[tuple[tuple[str, ...], Any]]:
    primary = _map(diag.get("primary"))
    kind = primary.get("kind")
    if isinstance(kind, str) and kind:
        # the verdict as a number: the primary finding's kind is in the key, its severity the value
        level = SEVERITY_LEVEL.get(str(primary.get("severity")), 0)
        yield (section, "severity"), level
        yield (section, "primary", safe_part(kind)), level
    worst: dict[str, int] = {}
    for finding in _list(diag.get("findings")):
        finding = _map(finding)
        name = finding.get("kind")
        if isinstance(name, str) and name:
            part = safe_part(name)
            worst[part] = max(worst.get(part, 0), SEVERITY_LEVEL.get(str(finding.get("severity")), 0))
    yield (section, "findings"), len(_list(diag.get("findings")))
    for part in sorted(worst)[:64]:
        yield (section, "finding", part), worst[part]


def flatten_summary(summary: Mapping[str, Any]) -> Flat:
    """``build_summary``'s dict (or a summary.json) as flat ``traceml/...`` keys with numeric values.

    Missing and non-finite values are left out.  Verdicts are numbers too:
    ``traceml/diagnosis/primary/<KIND>`` is the primary finding's severity level
    (0 info, 1 warn, 2 critical), ``traceml/diagnosis/finding/<KIND>`` each finding's.
    """
    out: Flat = {}
    for parts, value in _items(summary):
        number = _number(value)
        if number is None:
            continue
        out["/".join((PREFIX, *parts))] = number
    return out


def verdict(summary: Mapping[str, Any]) -> dict[str, str]:
    """The primary finding as strings (for tags and labels): kind, severity, summary line."""
    primary = _map(_map(summary.get("diagnosis")).get("primary"))
    return {
        "kind": str(primary.get("kind", "") or "UNKNOWN"),
        "severity": str(primary.get("severity", "") or "info"),
        "summary": str(primary.get("summary", "") or ""),
    }
