"""Live and final view models on hand-built stores: exact numbers, no clock, no I/O."""

from __future__ import annotations

import math

import numpy as np
import pytest

from traceml.schema import PHASES, PROCESS, STEP_MEMORY, STEP_TIME, SYSTEM, SYSTEM_GPU, rows_to_columns
from traceml.store import ColumnStore
from traceml.views import final_model, live_model
from traceml.views.final import MAX_FINDINGS, findings_from_summary
from traceml.views.live import node_rows, phase_rows, rank_rows, rank_skew

T0 = 1_700_000_000_000_000_000


def step_row(step: int, ts: int, phases: dict[str, int], failed: int = 0) -> tuple:
    values = [phases.get(p, -1) for p in PHASES]
    total = sum(v for v in values if v > 0)
    return (step, ts, failed, total, *values)


def add_steps(store: ColumnStore, rank: int, rows: list[tuple]) -> None:
    store.append(rank, "step_time", rows_to_columns(STEP_TIME, rows))


def uniform_steps(n: int, forward_us: int, dataloader_us: int = 100, start: int = 0, dt_ms: int = 10) -> list[tuple]:
    return [
        step_row(
            start + i, T0 + (start + i + 1) * dt_ms * 1_000_000, {"dataloader": dataloader_us, "forward": forward_us}
        )
        for i in range(n)
    ]


def test_phase_rows_are_of_the_job_and_name_the_worst_rank() -> None:
    store = ColumnStore()
    add_steps(store, 0, uniform_steps(10, forward_us=1000))
    add_steps(store, 1, uniform_steps(10, forward_us=3000))
    add_steps(store, 2, uniform_steps(10, forward_us=2000))
    rows = {r.phase: r for r in phase_rows(store.snapshot())}
    assert [r.phase for r in phase_rows(store.snapshot())] == [*PHASES, "step"]
    assert rows["forward"].median_us == 2000
    assert rows["forward"].worst_us == 3000 and rows["forward"].worst_rank == 1
    assert rows["dataloader"].median_us == 100
    # ties go to the lowest rank
    assert rows["dataloader"].worst_rank == 0
    # the job's step is the slowest rank's step (the job moves at its pace): that rank is named
    assert rows["step"].median_us == 3100 and rows["step"].worst_rank == 1
    # share = summed phase time over summed step time, every rank-step
    assert rows["forward"].share_pct == pytest.approx(100 * 6000 / 6300)
    assert sum(rows[p].share_pct for p in PHASES if not math.isnan(rows[p].share_pct)) == pytest.approx(100)
    # a model phase never measured (-1 everywhere): no number, no culprit
    assert math.isnan(rows["backward"].median_us) and rows["backward"].worst_rank == -1
    # no device copy recorded: the copy did not happen (0, as in the summary and the rules)
    assert rows["h2d"].median_us == 0 and rows["h2d"].share_pct == 0


def test_phase_window_looks_at_the_last_steps_and_skips_failed_ones() -> None:
    store = ColumnStore()
    rows = uniform_steps(50, forward_us=9000) + uniform_steps(10, forward_us=1000, start=50)
    rows.append(step_row(60, T0 + 61 * 10_000_000, {"forward": 1_000_000}, failed=1))
    add_steps(store, 0, rows)
    view = store.snapshot()
    assert {r.phase: r for r in phase_rows(view, window=10)}["forward"].median_us == 1000
    assert {r.phase: r for r in phase_rows(view, window=None)}["forward"].median_us == 9000


def test_rank_skew_is_slowest_over_fastest_median() -> None:
    store = ColumnStore()
    add_steps(store, 0, uniform_steps(5, forward_us=900))  # step 1000
    add_steps(store, 1, uniform_steps(5, forward_us=1400))  # step 1500
    add_steps(store, 2, uniform_steps(5, forward_us=1100))  # step 1200
    skew, slowest = rank_skew(store.snapshot())
    assert slowest == 1
    assert skew == pytest.approx(50.0)


def test_rank_skew_needs_two_ranks() -> None:
    store = ColumnStore()
    add_steps(store, 3, uniform_steps(5, forward_us=900))
    skew, slowest = rank_skew(store.snapshot())
    assert math.isnan(skew) and slowest == 3
    assert rank_skew(ColumnStore().snapshot())[1] == -1


def test_rank_rows_show_state_memory_drops_and_expected_ranks_not_seen() -> None:
    store = ColumnStore(meta={"expected_ranks": 3})
    add_steps(store, 0, uniform_steps(4, forward_us=500))
    store.append(
        0,
        "process",
        rows_to_columns(
            PROCESS, [(T0, 10.0, 100, 4, 9, -1, -1, -1), (T0 + 5, 55.5, 200, 4, 9, 1 << 20, 2 << 20, 8 << 30)]
        ),
    )
    store.append(0, "step_memory", rows_to_columns(STEP_MEMORY, [(0, T0, 5 << 20, 6 << 20), (1, T0, 7 << 20, 8 << 20)]))
    store.update_rank(
        0, host="h0", node_rank=0, state="connected", last_seen_ns=T0, drops={"process": 2, "step_time": 1}
    )
    store.update_rank(1, host="h1", node_rank=1, state="died", died_ns=T0)
    rows = {r.rank: r for r in rank_rows(store.snapshot())}
    assert sorted(rows) == [0, 1, 2]
    r0 = rows[0]
    assert (r0.state, r0.steps, r0.last_step) == ("connected", 4, 3)
    assert (r0.rss_bytes, r0.gpu_alloc_bytes, r0.gpu_peak_bytes) == (200, 1 << 20, 7 << 20)
    assert r0.cpu_pct == pytest.approx(55.5)
    assert r0.drops == 3
    # now = the newest row (T0 + 4 steps * 10 ms); last seen at T0
    assert r0.silent_s == pytest.approx(0.04)
    assert rows[1].state == "died" and rows[1].steps == 0 and rows[1].rss_bytes == -1
    assert rows[2].state == "waiting" and math.isnan(rows[2].silent_s)


def test_steps_count_rows_evicted_from_the_live_window() -> None:
    store = ColumnStore(capacity=5)
    add_steps(store, 0, uniform_steps(12, forward_us=500))
    (row,) = rank_rows(store.snapshot())
    assert row.steps == 12 and row.last_step == 11


def test_node_rows_keep_the_latest_sample_per_node_and_gpu() -> None:
    store = ColumnStore()
    store.append(0, "system", rows_to_columns(SYSTEM, [(T0 + 2, 0, 20.0, 5, 10), (T0 + 1, 0, 99.0, 9, 10)]))
    store.append(2, "system", rows_to_columns(SYSTEM, [(T0 + 1, 1, 30.0, 6, 12), (T0 + 3, 1, 40.0, 7, 12)]))
    store.append(
        0,
        "system_gpu",
        rows_to_columns(
            SYSTEM_GPU,
            [
                (T0 + 1, 0, 1, 10.0, 1, 100, 50.0, 70.0, 300.0),
                (T0 + 2, 0, 0, 80.0, 2, 100, 60.0, 90.0, 300.0),
                (T0 + 3, 0, 1, 70.0, 3, 100, 61.0, 91.0, 300.0),
            ],
        ),
    )
    nodes = node_rows(store.snapshot())
    assert [n.node_rank for n in nodes] == [0, 1]
    assert (nodes[0].cpu_pct, nodes[0].ram_used_bytes) == (20.0, 5)
    assert (nodes[1].cpu_pct, nodes[1].ram_used_bytes, nodes[1].ram_total_bytes) == (40.0, 7, 12)
    assert [(g.gpu_idx, g.util_pct, g.mem_used_bytes) for g in nodes[0].gpus] == [(0, 80.0, 2), (1, 70.0, 3)]
    assert nodes[1].gpus == ()


def test_live_model_reads_meta_and_derives_rates_from_timestamps() -> None:
    store = ColumnStore(
        meta={
            "run_name": "r",
            "start_ns": T0,
            "expected_ranks": 2,
            "status": "running",
            "recording_path": "x/run.tml",
            "recording_bytes": 4096,
        }
    )
    add_steps(store, 0, uniform_steps(11, forward_us=500, dt_ms=10))  # 10 intervals in 100 ms
    add_steps(store, 1, uniform_steps(11, forward_us=500, dt_ms=20))  # 10 intervals in 200 ms
    store.update_rank(1, drops={"step_time": 5})
    model = live_model(store.snapshot())
    assert model.run_name == "r" and model.status == "running" and model.expected_ranks == 2
    assert model.elapsed_s == pytest.approx(0.22)  # newest row: rank 1, step 10 at T0 + 11 * 20 ms
    # measured, the slowest rank's: its 9 steps after the 2 warm-up steps over the wall time from the
    # first one's start (ends T0 + 60 ms, took 0.6 ms) to the last one's end (T0 + 220 ms)
    assert model.steps_per_s == pytest.approx(9 / (0.220 - 0.0594))
    assert model.last_step == 10
    assert model.drops_total == 5
    assert (model.recording.path, model.recording.bytes, model.recording.error) == ("x/run.tml", 4096, "")


def test_live_model_before_any_data() -> None:
    model = live_model(ColumnStore(meta={"expected_ranks": 2}).snapshot())
    assert model.phases == () and model.last_step == -1 and math.isnan(model.elapsed_s)
    assert [r.state for r in model.ranks] == ["waiting", "waiting"]
    assert math.isnan(model.steps_per_s)


def test_views_are_pure_functions_of_the_view() -> None:
    store = ColumnStore(meta={"start_ns": T0})
    add_steps(store, 0, uniform_steps(20, forward_us=700))
    view = store.snapshot()
    first = live_model(view)
    add_steps(store, 0, uniform_steps(20, forward_us=9000, start=20))
    assert live_model(view) == first  # the old snapshot does not see the new rows
    assert live_model(store.snapshot()) != first


def test_final_model_reads_exit_and_summary_attachments() -> None:
    store = ColumnStore(meta={"run_name": "done", "expected_ranks": 1})
    add_steps(store, 0, uniform_steps(30, forward_us=500))
    store.attach("exit", {"exit_code": 130, "status": "interrupted", "duration_s": 12.5, "signal": "SIGINT"})
    primary = {"kind": "INPUT_BOUND", "severity": "critical", "rank": None, "summary": "input"}
    others = [{"kind": f"K{i}", "severity": "warn", "rank": i, "summary": f"s{i}"} for i in range(MAX_FINDINGS + 2)]
    store.attach("summary", {"diagnosis": {"primary": primary, "findings": [primary, *others]}})
    model = final_model(store.snapshot())
    assert (model.status, model.exit_code, model.signal, model.duration_s) == ("interrupted", 130, "SIGINT", 12.5)
    assert model.total_steps == 30
    assert model.findings[0].kind == "INPUT_BOUND"
    assert len(model.findings) == MAX_FINDINGS and model.more_findings == 3  # 1 + 8 distinct, 6 shown
    assert model.findings[1].rank == 0 and model.findings[1].text == "s0"


def test_final_model_without_attachments() -> None:
    model = final_model(ColumnStore().snapshot())
    assert (model.status, model.exit_code, model.findings, model.total_steps) == ("unknown", None, (), 0)


@pytest.mark.parametrize("summary", [None, 3, "x", {"diagnosis": "odd"}, {"findings": [1, None]}])
def test_findings_from_odd_summaries_are_empty(summary: object) -> None:
    assert findings_from_summary(summary) == []


def test_phase_rows_ignore_negative_missing_values_inside_a_phase() -> None:
    store = ColumnStore()
    rows = [step_row(i, T0 + i, {"forward": 100 if i % 2 else -1}) for i in range(10)]
    add_steps(store, 0, rows)
    fwd = {r.phase: r for r in phase_rows(store.snapshot())}["forward"]
    assert fwd.median_us == 100
    assert np.isfinite(fwd.share_pct)


def test_rank_skew_names_the_ddp_straggler_whose_wait_hides_in_the_others_backward() -> None:
    # DDP: both ranks' steps take 10 ms; rank 1 spends 4 ms more in forward, rank 0 waits
    # those 4 ms inside backward.  The median step time alone would blame nobody (or rank 0).
    store = ColumnStore()
    for rank, (fwd, bwd) in {0: (2_000, 6_000), 1: (6_000, 2_000)}.items():
        rows = [(s, 1_000 + s, 0, 10_000, 500, 0, fwd, bwd, 1_000, 500) for s in range(30)]
        store.append(rank, "step_time", rows_to_columns(STEP_TIME, rows))
    skew, slowest = rank_skew(store.snapshot())
    assert slowest == 1
    assert skew == pytest.approx(40.0)


def test_rank_skew_without_sync_uses_step_time() -> None:
    store = ColumnStore()
    for rank, step in {0: 10_000, 1: 12_000}.items():
        rows = [(s, 1_000 + s, 0, step, 500, 0, 3_000, 3_000, 1_000, step - 7_500) for s in range(30)]
        store.append(rank, "step_time", rows_to_columns(STEP_TIME, rows))
    skew, slowest = rank_skew(store.snapshot())
    assert slowest == 1 and skew == pytest.approx(20.0)
