"""System rules: GPU utilization from NVML samples (``system_gpu``), within the step window."""

from __future__ import annotations

import numpy as np

from traceml.diagnosis import thresholds as th
from traceml.diagnosis.findings import LOW_GPU_UTILIZATION, Finding
from traceml.diagnosis.step_rules import grade
from traceml.diagnosis.steps import StepData
from traceml.store import StoreView


def gpu_utilization(view: StoreView, span: tuple[int, int] | None) -> dict[tuple[int, int], np.ndarray]:
    """(node_rank, gpu_idx) -> utilization samples (percent) within ``span`` (all when None)."""
    out: dict[tuple[int, int], list[np.ndarray]] = {}
    for r in view.table_ranks("system_gpu"):
        cols = view.columns("system_gpu", r)
        ts = np.asarray(cols["ts_ns"], np.int64)
        keep = np.ones(len(ts), bool) if span is None else (ts >= span[0]) & (ts <= span[1])
        util = np.asarray(cols["util_pct"], np.float64)[keep]
        node = np.asarray(cols["node_rank"], np.int64)[keep]
        gpu = np.asarray(cols["gpu_idx"], np.int64)[keep]
        ok = np.isfinite(util) & (util >= 0)
        for key in {(int(n), int(g)) for n, g in zip(node[ok], gpu[ok], strict=True)}:
            sel = ok & (node == key[0]) & (gpu == key[1])
            out.setdefault(key, []).append(util[sel])
    return {k: np.concatenate(v) for k, v in out.items()}


def low_gpu_utilization(view: StoreView, data: StepData) -> Finding | None:
    per_gpu = {k: v for k, v in gpu_utilization(view, data.time_range()).items() if len(v) >= th.GPU_UTIL_MIN_SAMPLES}
    if not per_gpu:
        return None
    means = {k: float(v.mean()) for k, v in per_gpu.items()}
    typical = float(np.median(list(means.values())))
    samples = min(len(v) for v in per_gpu.values())
    severity = grade(
        typical,
        th.LOW_GPU_UTIL_WARN,
        th.LOW_GPU_UTIL_CRITICAL,
        samples,
        lower_is_worse=True,
    )
    if severity is None:
        return None
    lowest = min(means, key=lambda k: means[k])
    return Finding(
        kind=LOW_GPU_UTILIZATION,
        severity=severity,
        rank=None,
        summary=(
            f"low GPU utilization: {typical:.0f}% on average (median over {len(means)} GPU"
            f"{'s' if len(means) > 1 else ''}; lowest node {lowest[0]} GPU {lowest[1]} at {means[lowest]:.0f}%)"
        ),
        evidence={
            "util_pct": typical,
            "lowest_util_pct": means[lowest],
            "lowest_node_rank": lowest[0],
            "lowest_gpu_idx": lowest[1],
            "warn_util_pct": th.LOW_GPU_UTIL_WARN,
            "critical_util_pct": th.LOW_GPU_UTIL_CRITICAL,
            "gpus": len(means),
            "samples": samples,
        },
    )
