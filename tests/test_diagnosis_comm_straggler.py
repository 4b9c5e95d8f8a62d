"""Straggler causes with ``step_comm``: a rank's own exposed collective time is "communication";
the ranks that wait inside the all-reduce for a compute straggler do not make it one."""

from __future__ import annotations

from typing import Any

import numpy as np
from test_diagnosis_support import T0_NS, RunBuilder, ddp_straggler

from traceml.diagnosis import diagnose
from traceml.diagnosis import thresholds as th
from traceml.diagnosis.findings import STRAGGLER, Finding
from traceml.schema import STEP_COMM, rows_to_columns

N = 60


def comm_rows(b: RunBuilder, rank: int, exposed: Any, n: int = N, buckets: int = 4) -> None:
    """One ``step_comm`` row per step (exposed microseconds, scalar or one per step)."""
    e = np.broadcast_to(np.asarray(exposed, np.float64), (n,))
    rows = [(s, T0_NS + s, int(e[s] * 1.5), int(e[s]), buckets) for s in range(n)]
    b.store.append(rank, "step_comm", rows_to_columns(STEP_COMM, rows))


def stragglers(b: RunBuilder) -> list[Finding]:
    return [f for f in diagnose(b.view()).findings if f.kind == STRAGGLER]


def test_rank_with_its_own_slow_collective_is_a_communication_straggler() -> None:
    # rank 1 waits 20 ms in a blocking collective the others finish in 2 ms (counted in its residual)
    b = RunBuilder()
    for r in range(2):
        b.steps(r, N, residual=1_000.0 + (20_000.0 if r == 1 else 0.0), backward=60_000.0)
        comm_rows(b, r, 22_000.0 if r == 1 else 2_000.0)
    (f,) = stragglers(b)
    assert f.rank == 1
    assert f.labels["cause"] == "communication"
    assert f.evidence["own_comm_us"] > 15_000
    assert "straggler (communication)" in f.summary and "mostly communication" in f.summary


def test_communication_inside_backward_is_named_even_though_backward_is_equalised() -> None:
    # 4 ranks; rank 3's gradient all-reduce is exposed 25 ms longer (a slow link), no other excess
    b = RunBuilder()
    for r in range(4):
        b.steps(r, N, backward=60_000.0 + (25_000.0 if r == 3 else 0.0))
        comm_rows(b, r, 27_000.0 if r == 3 else 2_000.0)
    (f,) = stragglers(b)
    assert (f.rank, f.labels["cause"]) == (3, "communication")
    assert "mostly communication" in f.summary


def test_compute_straggler_is_not_called_communication_though_the_others_wait_in_all_reduce() -> None:
    # DDP: rank 1's forward is 20 ms longer; rank 0 waits for it inside the all-reduce (its exposed
    # comm is 20 ms larger), the straggler itself waits least
    for n_ranks, culprit in ((2, 1), (2, 0), (4, 2)):
        b = ddp_straggler(n_ranks=n_ranks, culprit=culprit, extra_us=20_000.0, phase="forward")
        for r in range(n_ranks):
            comm_rows(b, r, 2_000.0 if r == culprit else 22_000.0)
        (f,) = stragglers(b)
        assert (f.rank, f.labels["cause"]) == (culprit, "compute"), (n_ranks, culprit, f.summary)
        assert f.evidence["own_comm_us"] == 0.0
        assert f.evidence["delta_comm_exposed_us"] < 0


def test_comm_excess_under_the_gap_threshold_is_jitter() -> None:
    b = RunBuilder()
    small = th.STRAGGLER_COMM_MIN_GAP_US / 2
    for r in range(2):
        b.steps(r, N, forward=300.0, backward=300.0, optimizer=100.0, dataloader=100.0, residual=100.0, noise=0.0)
        comm_rows(b, r, 100.0 + (small if r == 1 else 0.0))
    assert stragglers(b) == []


def test_without_step_comm_the_causes_are_unchanged() -> None:
    (f,) = stragglers(ddp_straggler(n_ranks=2, culprit=1, extra_us=20_000.0, phase="residual"))
    assert f.labels["cause"] == "other"
    assert "own_comm_us" not in f.evidence


def _wait_shapes() -> dict[str, RunBuilder]:
    """Two ranks kept in step by collectives outside DDP, rank 1 the slow one, rank 0 waiting:
    ``manual``: gradients averaged with dist.all_reduce after backward, rank 1's backward 20 ms
    longer, rank 0 waiting 20 ms more in the all-reduces (its residual);
    ``async``: 40 async_op=True all-reduces waited before the optimizer, rank 1 slow to issue them
    (CPU-starved: 23 ms more of its residual outside the wait), rank 0 waiting that much more."""
    manual, issued = RunBuilder(), RunBuilder()
    for r in range(2):
        manual.steps(
            r,
            N,
            backward=60_000.0 + (20_000.0 if r == 1 else 0.0),
            residual=1_000.0 + (22_000.0 if r == 0 else 2_000.0),
        )
        comm_rows(manual, r, 22_000.0 if r == 0 else 2_000.0)
        issued.steps(
            r, N, forward=1_000.0, backward=1_500.0, optimizer=400.0, dataloader=0.0, residual=41_000.0 + 400.0 * r
        )
        comm_rows(issued, r, 35_000.0 if r == 0 else 12_000.0, buckets=80)
    return {"manual": manual, "async": issued}


def test_the_rank_that_waits_in_a_collective_outside_ddp_is_not_the_straggler() -> None:
    # before, rank 0 (the fast one) was named "straggler (communication)" or "(other)": its waiting
    # was counted as its own collective time or its own residual
    for shape, b in _wait_shapes().items():
        named = [(f.rank, f.labels["cause"], f.summary) for f in stragglers(b)]
        assert all(rank != 0 for rank, _, _ in named), (shape, named)
        assert all(cause != "communication" for _, cause, _ in named), (shape, named)
