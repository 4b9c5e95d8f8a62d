"""Hand-built runs for the diagnosis, report and compare tests (no test functions here).

:class:`RunBuilder` fills a real :class:`ColumnStore` with step, memory and system rows whose
phase times are chosen by the test, so each rule can be driven past (or kept under) its threshold.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from traceml.schema import PHASES, PROCESS, STEP_GPU, STEP_MEMORY, STEP_TIME, SYSTEM, SYSTEM_GPU, rows_to_columns
from traceml.store import ColumnStore, StoreView

T0_NS = 1_700_000_000_000_000_000
MiB = 1024 * 1024
GiB = 1024 * MiB


def _arr(value: float | Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    a = np.asarray(value, dtype=np.float64)
    return np.full(n, float(a)) if a.ndim == 0 else a.astype(np.float64)


class RunBuilder:
    def __init__(self, meta: dict[str, Any] | None = None, seed: int = 0) -> None:
        self.store = ColumnStore(capacity=None, meta=meta or {"run_id": "test-run", "run_name": "test"})
        self.rng = np.random.default_rng(seed)
        self.step_ts: dict[int, np.ndarray] = {}

    def steps(
        self,
        rank: int,
        n: int,
        *,
        dataloader: Any = 1_000.0,
        h2d: Any = 0.0,
        forward: Any = 30_000.0,
        backward: Any = 60_000.0,
        optimizer: Any = 8_000.0,
        residual: Any = 1_000.0,
        noise: float = 0.02,
        first_step: int = 0,
        failed: Iterable[int] = (),
        missing: Iterable[str] = (),
    ) -> RunBuilder:
        """``n`` steps of one rank; phase values in microseconds (scalar or one per step).

        ``noise`` is a relative jitter on every phase; ``missing`` phases are written as -1.
        """
        phases = {
            "dataloader": _arr(dataloader, n),
            "h2d": _arr(h2d, n),
            "forward": _arr(forward, n),
            "backward": _arr(backward, n),
            "optimizer": _arr(optimizer, n),
            "residual": _arr(residual, n),
        }
        if noise:
            phases = {p: v * (1 + noise * self.rng.standard_normal(n)).clip(0.5, 1.5) for p, v in phases.items()}
        cols_us = {p: np.rint(v).astype(np.int64) for p, v in phases.items()}
        step_us = sum(cols_us.values())
        for p in missing:
            cols_us[p] = np.full(n, -1, np.int64)
        ts = T0_NS + np.cumsum(step_us) * 1000
        failed_set = set(failed)
        rows = []
        for i in range(n):
            s = first_step + i
            rows.append(
                (s, int(ts[i]), 1 if s in failed_set else 0, int(step_us[i]), *(int(cols_us[p][i]) for p in PHASES))
            )
        self.store.append(rank, "step_time", rows_to_columns(STEP_TIME, rows))
        self.step_ts[rank] = ts
        return self

    def step_gpu(self, rank: int, steps: Sequence[int], h2d: Any, step_gpu: Any) -> RunBuilder:
        n = len(steps)
        h, s = _arr(h2d, n), _arr(step_gpu, n)
        rows = [(st, T0_NS + i, int(h[i]), 10, 10, 10, int(s[i])) for i, st in enumerate(steps)]
        self.store.append(rank, "step_gpu", rows_to_columns(STEP_GPU, rows))
        return self

    def step_memory(self, rank: int, peaks: Sequence[float], first_step: int = 0) -> RunBuilder:
        ts = self._sample_ts(rank, len(peaks), None)
        rows = [(first_step + i, int(ts[i]), int(p), int(p * 1.2)) for i, p in enumerate(peaks)]
        self.store.append(rank, "step_memory", rows_to_columns(STEP_MEMORY, rows))
        return self

    def process(
        self,
        rank: int,
        rss: Sequence[float],
        *,
        gpu_alloc: Sequence[float] | None = None,
        gpu_total: int = -1,
        period_ns: int | None = None,
    ) -> RunBuilder:
        """Process samples spread evenly over the rank's steps (or one per second)."""
        n = len(rss)
        ts = self._sample_ts(rank, n, period_ns)
        ga = [-1] * n if gpu_alloc is None else [int(x) for x in gpu_alloc]
        rows = [
            (int(ts[i]), 50.0, int(rss[i]), 8, 20, ga[i], -1 if ga[i] < 0 else int(ga[i] * 1.1), gpu_total)
            for i in range(n)
        ]
        self.store.append(rank, "process", rows_to_columns(PROCESS, rows))
        return self

    def system(self, rank: int, cpu: Sequence[float], ram_used: int = 8 * GiB, ram_total: int = 64 * GiB) -> RunBuilder:
        ts = self._sample_ts(rank, len(cpu), None)
        rows = [(int(ts[i]), 0, float(c), ram_used, ram_total) for i, c in enumerate(cpu)]
        self.store.append(rank, "system", rows_to_columns(SYSTEM, rows))
        return self

    def system_gpu(self, rank: int, util: Sequence[float], gpu_idx: int = 0, node_rank: int = 0) -> RunBuilder:
        ts = self._sample_ts(rank, len(util), None)
        rows = [
            (int(ts[i]), node_rank, gpu_idx, float(u), 10 * GiB, 80 * GiB, 60.0, 250.0, 400.0)
            for i, u in enumerate(util)
        ]
        self.store.append(rank, "system_gpu", rows_to_columns(SYSTEM_GPU, rows))
        return self

    def _sample_ts(self, rank: int, n: int, period_ns: int | None) -> np.ndarray:
        steps_ts = self.step_ts.get(rank)
        if period_ns is None and steps_ts is not None and len(steps_ts) > 1:
            return np.linspace(steps_ts[0], steps_ts[-1], n).astype(np.int64)
        return T0_NS + np.arange(n, dtype=np.int64) * (period_ns or 1_000_000_000)

    def rank(self, rank: int, **fields: Any) -> RunBuilder:
        self.store.update_rank(rank, **fields)
        return self

    def view(self) -> StoreView:
        return self.store.snapshot()


def ddp_straggler(
    n_ranks: int = 4,
    n: int = 60,
    *,
    culprit: int = 2,
    extra_us: float = 25_000.0,
    phase: str = "dataloader",
    seed: int = 0,
) -> RunBuilder:
    """DDP: ``culprit`` spends ``extra_us`` more in ``phase``; the others wait for it in backward,
    so every rank's step takes the same time and the culprit has the smallest backward."""
    b = RunBuilder(seed=seed)
    for r in range(n_ranks):
        kw: dict[str, Any] = {"dataloader": 1_000.0, "forward": 30_000.0, "optimizer": 8_000.0, "residual": 1_000.0}
        if r == culprit:
            kw[phase] = kw.get(phase, 0.0) + extra_us
            kw["backward"] = 60_000.0
        else:
            kw["backward"] = 60_000.0 + extra_us  # waiting for the culprit's gradients
        b.steps(r, n, **kw)
    return b
