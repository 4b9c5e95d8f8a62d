"""Each diagnosis rule on hand-built views: past its threshold, under it, and without its signal."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_diagnosis_support import GiB, MiB, RunBuilder, ddp_straggler

from traceml.diagnosis import (
    COMPUTE_BOUND,
    H2D_BOUND,
    HEALTHY,
    INPUT_BOUND,
    INSUFFICIENT_DATA,
    LOW_GPU_UTILIZATION,
    MEMORY_CREEP,
    RESIDUAL_HEAVY,
    STRAGGLER,
    diagnose,
    step_data,
    warmup_count,
)
from traceml.diagnosis import thresholds as th
from traceml.diagnosis.memory import analyse_series
from traceml.store import StoreView

# phases of a step that is not compute-bound and has no bottleneck: 95 ms, compute 84 %
BALANCED = {
    "dataloader": 5_000.0,
    "forward": 25_000.0,
    "backward": 50_000.0,
    "optimizer": 5_000.0,
    "residual": 10_000.0,
}


def kinds(d) -> list[str]:
    return [f.kind for f in d.findings]


def one(d, kind):
    found = d.by_kind(kind)
    assert len(found) == 1, f"expected one {kind}, found {kinds(d)}"
    return found[0]


# --- healthy / compute-bound ------------------------------------------------------------


def test_balanced_run_is_healthy_with_numbers() -> None:
    d = diagnose(RunBuilder().steps(0, 60, **BALANCED).view())
    assert d.primary.kind == HEALTHY
    assert d.primary.severity == "info"
    assert d.primary.evidence["steps"] == 55  # 60 minus 5 warm-up steps
    assert 90_000 < d.primary.evidence["step_median_us"] < 100_000
    assert "ms" in d.primary.summary


def test_compute_heavy_run_is_compute_bound_not_healthy() -> None:
    d = diagnose(RunBuilder().steps(0, 60).view())  # default phases: 98 % forward+backward+optimizer
    assert d.primary.kind == COMPUTE_BOUND
    assert d.primary.severity == "info"
    assert d.primary.evidence["share"] >= th.COMPUTE_BOUND_SHARE


# --- INPUT_BOUND ----------------------------------------------------------------------------


def test_input_bound_warn_between_thresholds() -> None:
    d = diagnose(RunBuilder().steps(0, 60, **{**BALANCED, "dataloader": 17_000.0}).view())
    f = one(d, INPUT_BOUND)
    assert f.severity == "warn"
    assert th.INPUT_WARN <= f.evidence["share"] < th.INPUT_CRITICAL
    assert d.primary.kind == INPUT_BOUND
    assert "dataloader wait is 16%" in f.summary or "dataloader wait is 15%" in f.summary


def test_input_bound_critical_needs_enough_steps() -> None:
    heavy = {**BALANCED, "dataloader": 60_000.0}  # ~39 % of the step
    long_run = diagnose(RunBuilder().steps(0, 60, **heavy).view())
    assert one(long_run, INPUT_BOUND).severity == "critical"
    short_run = diagnose(RunBuilder().steps(0, 15, **heavy).view())  # 12 steps after warm-up
    assert one(short_run, INPUT_BOUND).severity == "warn"


def test_input_share_under_threshold_gives_no_finding() -> None:
    d = diagnose(RunBuilder().steps(0, 60, **{**BALANCED, "dataloader": 6_000.0}).view())
    assert INPUT_BOUND not in kinds(d)


def test_no_dataloader_column_counts_as_zero_wait() -> None:
    view = RunBuilder().steps(0, 60, missing=["dataloader", "h2d"]).view()
    data = step_data(view)
    assert np.all(data.per_rank[0].phases["dataloader"] == 0)
    d = diagnose(view)
    assert INPUT_BOUND not in kinds(d)
    assert d.primary.kind == COMPUTE_BOUND


def test_input_bound_reports_median_rank_and_worst_rank() -> None:
    b = RunBuilder()
    for r, dl in enumerate([20_000.0, 22_000.0, 24_000.0, 70_000.0]):
        b.steps(r, 60, **{**BALANCED, "dataloader": dl})
    f = one(diagnose(b.view()), INPUT_BOUND)
    assert f.rank is None
    assert f.evidence["worst_rank"] == 3
    assert f.evidence["ranks"] == 4
    assert f.evidence["worst_rank_share"] > f.evidence["share"]


# --- RESIDUAL_HEAVY / missing phases ----------------------------------------------------------


def test_residual_heavy_critical() -> None:
    d = diagnose(RunBuilder().steps(0, 60, **{**BALANCED, "residual": 45_000.0}).view())
    f = one(d, RESIDUAL_HEAVY)
    assert f.severity == "critical"
    assert f.evidence["share"] >= th.RESIDUAL_CRITICAL


def test_residual_rule_abstains_without_model_phases_and_says_so() -> None:
    view = RunBuilder().steps(0, 60, missing=["forward", "backward", "optimizer"]).view()
    d = diagnose(view)
    assert RESIDUAL_HEAVY not in kinds(d)
    assert COMPUTE_BOUND not in kinds(d)
    assert d.primary.kind == INSUFFICIENT_DATA
    assert d.primary.severity == "info"
    assert "forward/backward" in d.primary.summary


def test_missing_residual_is_recomputed_from_the_step() -> None:
    view = RunBuilder().steps(0, 30, noise=0.0, missing=["residual"], **BALANCED).view()
    data = step_data(view)
    assert np.allclose(data.per_rank[0].phases["residual"], 10_000.0)


# --- H2D_BOUND --------------------------------------------------------------------------------


def test_h2d_bound_uses_the_gpu_clock() -> None:
    b = RunBuilder().steps(0, 60, **BALANCED)
    b.step_gpu(0, list(range(60)), h2d=30_000.0, step_gpu=95_000.0)
    f = one(diagnose(b.view()), H2D_BOUND)
    assert f.severity == "critical"
    assert f.evidence["share"] == pytest.approx(30 / 95, rel=1e-3)


def test_h2d_rule_needs_step_gpu() -> None:
    # a large CPU-side h2d without GPU timing is not an H2D finding
    d = diagnose(RunBuilder().steps(0, 60, **{**BALANCED, "h2d": 30_000.0}).view())
    assert H2D_BOUND not in kinds(d)
    assert any("step_gpu" in m for m in d.missing)


def test_small_h2d_on_gpu_clock_is_not_flagged() -> None:
    b = RunBuilder().steps(0, 60, **BALANCED)
    b.step_gpu(0, list(range(60)), h2d=2_000.0, step_gpu=95_000.0)
    assert H2D_BOUND not in kinds(diagnose(b.view()))


# --- STRAGGLER ----------------------------------------------------------------------------------


def test_ddp_input_straggler_has_the_smallest_backward() -> None:
    view = ddp_straggler(n_ranks=4, culprit=2, extra_us=40_000.0).view()
    d = diagnose(view)
    f = one(d, STRAGGLER)
    assert f.rank == 2
    assert f.labels["cause"] == "input"
    assert f.labels["top_phase"] == "dataloader"
    assert f.evidence["steps_synchronised"] == 1
    assert f.evidence["culprit_backward_median_us"] < f.evidence["others_backward_median_us"]
    assert f.evidence["gap_us"] == pytest.approx(40_000, rel=0.1)
    assert f.severity == "critical"
    assert d.primary.kind == STRAGGLER
    assert "rank 2" in f.summary and "backward" in f.summary


def test_two_rank_ddp_straggler_does_not_blame_the_waiting_rank() -> None:
    f = one(diagnose(ddp_straggler(n_ranks=2, culprit=1, extra_us=20_000.0).view()), STRAGGLER)
    assert f.rank == 1
    assert f.labels["cause"] == "input"


def test_forward_straggler_is_a_compute_cause() -> None:
    f = one(diagnose(ddp_straggler(n_ranks=3, culprit=0, phase="forward", extra_us=20_000.0).view()), STRAGGLER)
    assert f.rank == 0
    assert f.labels["cause"] == "compute"


def test_unsynchronised_slow_backward_rank_is_found_by_step_time() -> None:
    b = RunBuilder()
    for r in range(3):
        b.steps(r, 60, backward=60_000.0 if r != 1 else 90_000.0)
    f = one(diagnose(b.view()), STRAGGLER)
    assert f.rank == 1
    assert f.evidence["steps_synchronised"] == 0
    assert f.labels["cause"] == "compute"
    assert f.labels["top_phase"] == "backward"


def test_equal_ranks_have_no_straggler() -> None:
    b = RunBuilder()
    for r in range(4):
        b.steps(r, 60)
    d = diagnose(b.view())
    assert STRAGGLER not in kinds(d)


def test_small_skew_under_threshold_is_not_a_straggler() -> None:
    f = diagnose(ddp_straggler(n_ranks=4, extra_us=5_000.0).view()).by_kind(STRAGGLER)
    assert f == []


# --- MEMORY_CREEP -------------------------------------------------------------------------------


def test_confirmed_rss_creep() -> None:
    rss = np.linspace(2 * GiB, 2.6 * GiB, 120)
    b = RunBuilder().steps(0, 60).process(0, rss)
    f = one(diagnose(b.view()), MEMORY_CREEP)
    assert f.labels == {"source": "rss", "stage": "confirmed"}
    assert f.severity == "warn"
    assert f.rank == 0
    assert f.evidence["growth_bytes"] > 0.4 * GiB
    assert "confirmed" in f.summary


def test_early_creep_is_info() -> None:
    rss = np.linspace(2 * GiB, 2 * GiB + 120 * MiB, 40)  # 6 % rise over few samples
    f = one(diagnose(RunBuilder().steps(0, 60).process(0, rss).view()), MEMORY_CREEP)
    assert f.labels["stage"] == "early"
    assert f.severity == "info"


def test_creep_near_capacity_is_critical() -> None:
    peaks = np.linspace(60 * GiB, 76 * GiB, 200)
    b = RunBuilder().steps(0, 200).step_memory(0, peaks).process(0, [1 * GiB] * 50, gpu_total=80 * GiB)
    f = one(diagnose(b.view()), MEMORY_CREEP)
    assert f.labels["source"] == "gpu_step_peak"
    assert f.severity == "critical"


def test_flat_noisy_memory_does_not_creep() -> None:
    rng = np.random.default_rng(1)
    rss = 2 * GiB + rng.normal(0, 20 * MiB, 200)
    assert MEMORY_CREEP not in kinds(diagnose(RunBuilder().steps(0, 60).process(0, rss).view()))


def test_rise_then_fall_is_not_a_creep() -> None:
    rss = np.concatenate([np.linspace(2 * GiB, 3 * GiB, 100), np.linspace(3 * GiB, 2.2 * GiB, 100)])
    c = analyse_series(rss)
    assert c is not None and not c.creeping


def test_one_step_jump_below_noise_floor_is_not_a_creep() -> None:
    rss = np.concatenate([np.full(50, 2 * GiB), np.full(50, 2 * GiB + 4 * MiB)])
    assert MEMORY_CREEP not in kinds(diagnose(RunBuilder().steps(0, 60).process(0, rss).view()))


def test_short_memory_series_abstains_and_says_so() -> None:
    d = diagnose(RunBuilder().steps(0, 60).process(0, np.linspace(GiB, 2 * GiB, 10)).view())
    assert MEMORY_CREEP not in kinds(d)
    assert any("rss" in m for m in d.missing)


def test_worst_creeping_rank_is_named() -> None:
    b = RunBuilder()
    for r, top in enumerate([2.05, 2.8, 2.3]):
        b.steps(r, 60).process(r, np.linspace(2 * GiB, top * GiB, 100))
    f = one(diagnose(b.view()), MEMORY_CREEP)
    assert f.rank == 1
    assert f.evidence["ranks_checked"] == 3


# --- LOW_GPU_UTILIZATION ------------------------------------------------------------------------


def test_low_gpu_utilization_warn_and_critical() -> None:
    warn = diagnose(RunBuilder().steps(0, 60).system_gpu(0, [20.0] * 30).view())
    assert one(warn, LOW_GPU_UTILIZATION).severity == "warn"
    crit = diagnose(RunBuilder().steps(0, 60).system_gpu(0, [5.0] * 30).view())
    f = one(crit, LOW_GPU_UTILIZATION)
    assert f.severity == "critical"
    assert f.evidence["util_pct"] == pytest.approx(5.0)


def test_busy_gpu_is_not_flagged_and_missing_nvml_is_named() -> None:
    busy = diagnose(RunBuilder().steps(0, 60).system_gpu(0, [85.0] * 30).view())
    assert LOW_GPU_UTILIZATION not in kinds(busy)
    none = diagnose(RunBuilder().steps(0, 60).view())
    assert any("system_gpu" in m for m in none.missing)


def test_gpu_utilization_counts_only_the_window() -> None:
    # idle GPU during warm-up/at the end is outside the steps' time range when samples are timed so
    b = RunBuilder().steps(0, 60).system_gpu(0, [90.0] * 30)
    d = diagnose(b.view(), last_n=20)
    assert LOW_GPU_UTILIZATION not in kinds(d)


# --- INSUFFICIENT_DATA, failed steps, warm-up, windows -----------------------------------------


def test_empty_view_is_insufficient_data_naming_step_timings() -> None:
    d = diagnose(StoreView())
    assert d.primary.kind == INSUFFICIENT_DATA
    assert d.primary.severity == "warn"
    assert "step_time" in d.primary.summary
    assert d.window.steps == 0


def test_too_few_steps_is_insufficient_data() -> None:
    d = diagnose(RunBuilder().steps(0, 4, dataloader=90_000.0).view())
    assert d.primary.kind == INSUFFICIENT_DATA
    assert "enough steps" in d.primary.summary
    assert INPUT_BOUND not in kinds(d)


def test_all_failed_steps_is_insufficient_data() -> None:
    d = diagnose(RunBuilder().steps(0, 20, failed=range(20)).view())
    assert d.primary.kind == INSUFFICIENT_DATA
    assert "20 failed" in d.primary.summary
    assert d.window.failed_rows == 20


def test_failed_steps_are_skipped() -> None:
    b = RunBuilder()
    b.steps(0, 60, **BALANCED)
    # ten failed steps with a huge dataloader wait, written after the good ones (step numbers 60..69)
    b.steps(0, 10, first_step=60, failed=range(60, 70), **{**BALANCED, "dataloader": 500_000.0})
    d = diagnose(b.view())
    assert INPUT_BOUND not in kinds(d)
    assert d.window.failed_rows == 10
    assert d.window.last_step == 59


def test_warmup_steps_are_skipped() -> None:
    dl = np.full(60, 5_000.0)
    dl[:5] = 2_000_000.0  # slow first batches (worker start-up, compilation)
    d = diagnose(RunBuilder().steps(0, 60, **{**BALANCED, "dataloader": dl}).view())
    assert INPUT_BOUND not in kinds(d)
    assert d.window.warmup_steps == 5
    assert d.window.first_step == 5


def test_warmup_is_capped_on_short_runs() -> None:
    assert warmup_count(10) == 2
    assert warmup_count(3) == 0
    assert warmup_count(1000) == th.WARMUP_STEPS


def test_last_n_window_sees_only_recent_steps() -> None:
    dl = np.concatenate([np.full(100, 60_000.0), np.full(50, 5_000.0)])  # input problem fixed at step 100
    view = RunBuilder().steps(0, 150, **{**BALANCED, "dataloader": dl}).view()
    whole = diagnose(view)
    recent = diagnose(view, last_n=50)
    assert whole.primary.kind == INPUT_BOUND
    assert INPUT_BOUND not in kinds(recent)
    assert recent.window.steps == 50
    assert recent.window.first_step == 100
    assert recent.window.last_n == 50


def test_straggler_outranks_input_bound_of_same_severity() -> None:
    d = diagnose(ddp_straggler(n_ranks=2, culprit=0, extra_us=60_000.0).view())
    assert {STRAGGLER, INPUT_BOUND} <= set(kinds(d))
    assert d.primary.kind == STRAGGLER


def test_diagnosis_is_deterministic_and_json_safe() -> None:
    view = ddp_straggler().process(0, np.linspace(GiB, 2 * GiB, 80)).view()
    a, b = diagnose(view).to_dict(), diagnose(view).to_dict()
    assert a == b
    json.dumps(a, allow_nan=False)


def test_waiting_in_backward_behind_a_straggler_is_not_called_compute_bound() -> None:
    d = diagnose(ddp_straggler(n_ranks=4, extra_us=40_000.0).view())
    assert STRAGGLER in kinds(d)
    assert COMPUTE_BOUND not in kinds(d)


@pytest.mark.parametrize("ranks", [2, 3, 4, 7, 16])
def test_others_median_equals_the_median_of_the_other_rows(ranks: int) -> None:
    from traceml.diagnosis.step_rules import others_median

    m = np.random.default_rng(ranks).integers(0, 5, size=(ranks, 50)).astype(float)  # many ties
    fast = others_median(m)
    for i in range(ranks):
        assert np.array_equal(fast[i], np.median(np.delete(m, i, axis=0), axis=0))


def test_straggler_without_a_dominant_phase_has_a_mixed_cause() -> None:
    # rank 1 loses 20 ms every step, but in a different phase each time: no phase explains the gap
    extra = np.zeros((3, 90))
    for i in range(90):
        extra[i % 3, i] = 20_000.0
    b = RunBuilder()
    b.steps(0, 90).steps(2, 90)
    b.steps(1, 90, dataloader=1_000.0 + extra[0], forward=30_000.0 + extra[1], optimizer=8_000.0 + extra[2])
    f = one(diagnose(b.view()), STRAGGLER)
    assert f.rank == 1
    assert f.evidence["steps_synchronised"] == 0
    assert f.labels["cause"] == "mixed"
