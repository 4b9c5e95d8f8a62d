"""Synthetic runs: deterministic per-rank columns for every standard table.

Vectorised numpy, seeded; no torch.  Used by benchmarks and tests that need a recording without training.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from traceml.schema import GPU_PHASES, PHASES, STANDARD_TABLES
from traceml.store import ColumnStore

if TYPE_CHECKING:
    from traceml.format import TmlWriter

#: 2023-11-14T22:13:20Z, a round wall-clock origin for synthetic runs
START_NS = 1_700_000_000_000_000_000
Run = dict[int, dict[str, dict[str, Any]]]

_BASE_US = {"dataloader": 900, "h2d": 300, "forward": 3_000, "backward": 5_000, "optimizer": 600, "residual": 200}


def synthetic_run(
    ranks: int = 2,
    steps: int = 100,
    *,
    seed: int = 0,
    slow_rank: int | None = None,
    gpu: bool = False,
    start_ns: int = START_NS,
    sample_every: int = 20,
    first_step: int = 0,
    nodes: int = 1,
) -> Run:
    """``{rank: {table: columns}}`` for a run of ``steps`` steps on ``ranks`` ranks.

    Process samples come every ``sample_every`` steps; system samples from the first rank of
    each node.  Timestamps grow with the step durations, so throughput is consistent.
    """
    rng = np.random.default_rng(seed)
    run: Run = {}
    per_node = max(1, ranks // max(1, nodes))
    for r in range(ranks):
        step = np.arange(first_step, first_step + steps, dtype=np.int64)
        phases: dict[str, np.ndarray] = {}
        for p in PHASES:
            base = _BASE_US[p] * (1.6 if (p == "forward" and r == slow_rank) else 1.0)
            noise = rng.gamma(8.0, base / 8.0, size=steps)
            phases[p] = np.maximum(noise, 1).astype(np.int64)
        step_us = np.sum(np.stack(list(phases.values())), axis=0)
        ts = start_ns + np.cumsum(step_us) * 1000 + r * 1000
        tables: dict[str, dict[str, Any]] = {
            "step_time": {
                "step": step,
                "ts_ns": ts,
                "failed": np.zeros(steps, dtype=np.uint8),
                "step_us": step_us,
                **{f"{p}_us": phases[p] for p in PHASES},
            }
        }
        sample_idx = np.arange(0, steps, max(1, sample_every))
        k = len(sample_idx)
        sample_ts = ts[sample_idx]
        gib = 1024**3
        tables["process"] = {
            "ts_ns": sample_ts,
            "cpu_pct": (90 + 10 * rng.random(k)).astype(np.float32),
            "rss_bytes": (2 * gib + np.linspace(0, 0.25 * gib, k) + r * 10_000_000).astype(np.int64),
            "threads": np.full(k, 12, dtype=np.int32),
            "fds": np.full(k, 40, dtype=np.int32),
            "gpu_alloc_bytes": (np.full(k, 6 * gib) if gpu else np.full(k, -1)).astype(np.int64),
            "gpu_reserved_bytes": (np.full(k, 7 * gib) if gpu else np.full(k, -1)).astype(np.int64),
            "gpu_total_bytes": (np.full(k, 80 * gib) if gpu else np.full(k, -1)).astype(np.int64),
        }
        if gpu:
            tables["step_gpu"] = {
                "step": step,
                "ts_ns": ts + 500_000,
                **{f"{p}_gpu_us": phases.get(p, step_us) * 9 // 10 for p in GPU_PHASES},
            }
            tables["step_memory"] = {
                "step": step,
                "ts_ns": ts,
                "peak_alloc_bytes": (9 * gib + rng.integers(0, gib // 4, steps)).astype(np.int64),
                "peak_reserved_bytes": np.full(steps, 10 * gib, dtype=np.int64),
            }
        if r % per_node == 0:
            node = r // per_node
            tables["system"] = {
                "ts_ns": sample_ts,
                "node_rank": np.full(k, node, dtype=np.int32),
                "cpu_pct": (50 + 20 * rng.random(k)).astype(np.float32),
                "ram_used_bytes": (40 * gib + rng.integers(0, gib, k)).astype(np.int64),
                "ram_total_bytes": np.full(k, 256 * gib, dtype=np.int64),
            }
            if gpu:
                g = np.arange(per_node, dtype=np.int32)
                gts = np.repeat(sample_ts, per_node)
                gidx = np.tile(g, k)
                n = len(gts)
                tables["system_gpu"] = {
                    "ts_ns": gts,
                    "node_rank": np.full(n, node, dtype=np.int32),
                    "gpu_idx": gidx,
                    "util_pct": (85 + 10 * rng.random(n)).astype(np.float32),
                    "mem_used_bytes": np.full(n, 10 * gib, dtype=np.int64),
                    "mem_total_bytes": np.full(n, 80 * gib, dtype=np.int64),
                    "temp_c": (60 + 5 * rng.random(n)).astype(np.float32),
                    "power_w": (300 + 50 * rng.random(n)).astype(np.float32),
                    "power_limit_w": np.full(n, 700, dtype=np.float32),
                }
        run[r] = tables
    return run


def run_meta(name: str = "synthetic", ranks: int = 2, start_ns: int = START_NS) -> dict[str, Any]:
    return {"run_name": name, "run_id": f"{name}-0001", "start_ns": start_ns, "expected_ranks": ranks}


def rank_infos(run: Run, state: str = "finished", exit_status: str = "ok") -> list[dict[str, Any]]:
    out = []
    for r, tables in sorted(run.items()):
        last = max(int(c["ts_ns"][-1]) for c in tables.values() if len(c["ts_ns"]))
        out.append(
            {
                "rank": r,
                "local_rank": r,
                "node_rank": 0,
                "host": "node0",
                "pid": 1000 + r,
                "state": state,
                "exit_status": exit_status,
                "last_seen_ns": last,
                "drops": {},
            }
        )
    return out


def fill_store(store: ColumnStore, run: Run, chunk: int | None = None) -> ColumnStore:
    """Append ``run`` to ``store`` the way the aggregator does: per rank, per table, in batches of ``chunk`` rows."""
    for r, tables in sorted(run.items()):
        for name, cols in tables.items():
            n = len(cols["ts_ns"])
            step = chunk or max(n, 1)
            for a in range(0, n, step):
                store.append(r, name, {c: v[a : a + step] for c, v in cols.items()}, STANDARD_TABLES.get(name))
    return store


def store_from_run(run: Run, meta: Mapping[str, Any] | None = None, capacity: int | None = None) -> ColumnStore:
    store = ColumnStore(capacity=capacity, meta=meta or run_meta(ranks=len(run)))
    return fill_store(store, run)


def write_recording(
    path: str | os.PathLike[str],
    run: Run,
    *,
    meta: Mapping[str, Any] | None = None,
    attachments: Mapping[str, Mapping[str, Any]] | None = None,
    chunk_steps: int | None = None,
    close: bool = True,
    **writer_options: Any,
) -> TmlWriter:
    """Write ``run`` to a ``.tml`` file as a run would: interleaved by time, ``chunk_steps`` steps at a time.

    Every table is sliced in proportion to the steps, so process and system samples arrive
    with the steps around them.  ``close=False`` leaves the writer open (the caller closes it,
    or copies the file first to get a recording whose writer "crashed").
    """
    from traceml.format import TmlWriter

    writer_options.setdefault("fsync_interval_s", None)
    steps = max((len(t["step_time"]["step"]) for t in run.values() if "step_time" in t), default=1)
    chunk = chunk_steps or steps
    writer = TmlWriter(path, run_meta=dict(meta or run_meta(ranks=len(run))), **writer_options)
    try:
        for a in range(0, steps, chunk):
            b = min(a + chunk, steps)
            for r, tables in sorted(run.items()):
                for name, cols in tables.items():
                    n = len(cols["ts_ns"])
                    lo, hi = a * n // steps, (n if b == steps else b * n // steps)
                    if hi > lo:
                        writer.append(r, name, {c: v[lo:hi] for c, v in cols.items()})
        for name, data in (attachments or {}).items():
            writer.attach(name, data)
        if close:
            writer.close()
    except BaseException:
        writer.close()
        raise
    return writer
