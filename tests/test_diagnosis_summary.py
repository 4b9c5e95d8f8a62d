"""build_summary: the versioned summary dict, validated against docs/summary.schema.json."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import msgpack
import numpy as np
import pytest
from test_diagnosis_support import GiB, RunBuilder, ddp_straggler

from traceml.diagnosis import SCHEMA_VERSION, build_summary, summary_lines
from traceml.schema import STEP_REGION, rows_to_columns
from traceml.store import ColumnStore, StoreView

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "docs" / "summary.schema.json"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def rich_view() -> StoreView:
    b = ddp_straggler(n_ranks=2, culprit=1, extra_us=30_000.0)
    for r in range(2):
        b.process(r, np.linspace(2 * GiB, 2.5 * GiB, 80), gpu_alloc=[3 * GiB] * 80, gpu_total=80 * GiB)
        b.step_memory(r, [4 * GiB] * 60)
        b.rank(r, host=f"node{r}", node_rank=r, state="finished", exit_status="ok")
    b.system(0, [40.0] * 20).system_gpu(0, [55.0] * 20).system_gpu(0, [65.0] * 20, gpu_idx=1)
    regions = [(s, 0, "tokenize", 1500, 2) for s in range(60)]
    b.store.append(0, "step_region", rows_to_columns(STEP_REGION, regions))
    b.store.attach("exit", {"status": "ok", "exit_code": 0, "duration_s": 12.5})
    b.store.set_meta(run_id="abc123", run_name="demo", world_size=2, start_ns=1_700_000_000_000_000_000)
    return b.view()


def test_full_summary_validates_against_the_schema(validator) -> None:
    s = build_summary(rich_view())
    validator.validate(s)
    assert s["schema_version"] == SCHEMA_VERSION == 1
    assert s["run"]["id"] == "abc123"
    assert s["run"]["world_size"] == 2
    assert s["run"]["hosts"] == ["node0", "node1"]
    assert s["run"]["exit_status"] == "ok" and s["run"]["exit_code"] == 0
    assert s["run"]["duration_s"] == 12.5
    assert s["run"]["start"].startswith("2023-11-14T22:13:20")
    assert s["diagnosis"]["primary"]["kind"] == "STRAGGLER"
    assert s["diagnosis"]["primary"]["rank"] == 1
    assert s["memory"]["peak_gpu_alloc_bytes"] == 4 * GiB
    assert s["memory"]["gpu_total_bytes"] == 80 * GiB
    assert [g["gpu_idx"] for g in s["system"]["gpus"]] == [0, 1]
    assert s["system"]["gpus"][1]["util_pct_mean"] == pytest.approx(65.0)
    assert s["regions"][0]["name"] == "tokenize" and s["regions"][0]["median_ms"] == pytest.approx(1.5)
    assert s["integrity"]["status"] == "live" and s["integrity"]["complete"] is True


def test_empty_view_summary_validates(validator) -> None:
    s = build_summary(StoreView())
    validator.validate(s)
    assert s["steps"]["count"] == 0
    assert s["steps"]["overall"]["step"] == {"median_ms": None, "p95_ms": None, "mean_ms": None}
    assert s["diagnosis"]["primary"]["kind"] == "INSUFFICIENT_DATA"


def test_summary_is_json_and_msgpack_safe_and_deterministic() -> None:
    view = rich_view()
    a, b = build_summary(view), build_summary(view)
    assert a == b
    text = json.dumps(a, allow_nan=False)
    assert json.loads(text) == a
    assert msgpack.unpackb(msgpack.packb(a), strict_map_key=False) == a


def test_phase_statistics_are_exact_on_noise_free_steps() -> None:
    b = RunBuilder()
    b.steps(0, 25, noise=0.0, dataloader=np.arange(25) * 1000.0)  # 0..24 ms
    b.steps(1, 25, noise=0.0, dataloader=2_000.0)
    s = build_summary(b.view())
    r0 = s["steps"]["per_rank"][0]["phases"]
    # warm-up: 5 steps -> steps 5..24: dataloader 5..24 ms, median 14.5, p95 (linear) 23.05
    assert s["steps"]["warmup_steps"] == 5 and s["steps"]["count"] == 20
    assert r0["dataloader"]["median_ms"] == pytest.approx(14.5)
    assert r0["dataloader"]["p95_ms"] == pytest.approx(23.05)
    assert r0["forward"]["median_ms"] == pytest.approx(30.0)
    # overall: a step takes as long as the slowest rank; phases are averaged over ranks
    overall = s["steps"]["overall"]
    assert overall["step"]["median_ms"] == pytest.approx(
        99.0 + 14.5
    )  # forward 30 + backward 60 + optimizer 8 + residual 1
    assert overall["dataloader"]["median_ms"] == pytest.approx((14.5 + 2.0) / 2)
    assert s["steps"]["throughput_steps_per_s"] == pytest.approx(1000 / 113.5, rel=1e-4)


def test_integrity_counts_what_was_lost() -> None:
    store = ColumnStore(capacity=30)
    b = RunBuilder()
    b.store = store
    b.steps(0, 50).steps(1, 50, failed=[10, 11])
    store.update_rank(0, drops={"process": 7}, state="finished", exit_status="ok")
    store.update_rank(1, state="died", exit_status="failed")
    store.set_integrity(
        {"status": "recovered", "skipped": [{"offset": 10, "length": 99, "reason": "x"}], "lost_bytes": 99}
    )
    s = build_summary(store.snapshot())
    integ = s["integrity"]
    assert integ["status"] == "recovered" and integ["recovered"] is True and integ["complete"] is False
    assert integ["lost"]["rows_dropped"] == 7 and integ["lost"]["rows_dropped_by_table"] == {"process": 7}
    assert integ["lost"]["rows_evicted"] == 40  # 2 ranks x (50 - 30)
    assert integ["lost"]["skipped_records"] == 1 and integ["lost"]["bytes"] == 99
    assert integ["lost"]["ranks_died"] == [1]
    assert s["run"]["exit_status"] == "failed"  # no exit attachment: derived from the ranks


def test_recent_diagnosis_covers_the_last_steps() -> None:
    dl = np.concatenate([np.full(150, 60_000.0), np.full(100, 2_000.0)])
    s = build_summary(RunBuilder().steps(0, 250, dataloader=dl).view(), recent_steps=100)
    assert s["diagnosis"]["primary"]["kind"] == "INPUT_BOUND"
    assert s["diagnosis_recent"]["primary"]["kind"] != "INPUT_BOUND"
    assert s["diagnosis_recent"]["window"]["steps"] == 100


def test_summary_lines_lead_with_the_primary_verdict() -> None:
    s = build_summary(rich_view())
    lines = summary_lines(s)
    assert lines[0].startswith("[critical] STRAGGLER") or lines[0].startswith("[warn] STRAGGLER")
    assert any(line.startswith("steps: ") for line in lines)
    assert any("peak memory" in line for line in lines)


def test_tracemls_own_cost_is_the_median_over_ranks_and_its_share_of_the_median_step(validator) -> None:
    from traceml.schema import TRACEML_COST
    from traceml.views.final import traceml_cost_text

    view = rich_view()
    assert build_summary(view)["traceml"] == {"overhead_us_per_step": None, "overhead_share": None, "per_rank": []}
    b = ddp_straggler(n_ranks=3, culprit=1, extra_us=0.0)
    # cumulative rows; the last (most steps) counts: rank r cost (4 + r) µs on the thread + 1 µs of threads' CPU
    for r in range(3):
        rows = [(1, 50, 1, 1_000, 10_000), (2, 100, 2, (4 + r) * 2 * 1000, 100 * 1000)]
        b.store.append(r, "traceml_cost", rows_to_columns(TRACEML_COST, rows[::-1]))
    s = build_summary(b.view())
    validator.validate(s)
    sec = s["traceml"]
    assert [p["us_per_step"] for p in sec["per_rank"]] == [5.0, 6.0, 7.0]
    assert sec["per_rank"][0]["training_thread_us_per_step"] == 4.0
    assert sec["per_rank"][0]["threads_cpu_us_per_step"] == 1.0
    assert sec["overhead_us_per_step"] == 6.0
    median_step_us = s["steps"]["overall"]["step"]["median_ms"] * 1000
    assert sec["overhead_share"] == pytest.approx(6.0 / median_step_us, rel=0.01)  # rounded like every figure
    text = traceml_cost_text(s)
    assert text.startswith("traceml cost 6.0 µs per step (") and text.endswith("%)")
    assert text in summary_lines(s)
    from traceml.diagnosis.flat import flatten_summary

    assert flatten_summary(s)["traceml/traceml/overhead_us_per_step"] == 6.0  # W&B / MLflow keys too


def test_the_schema_lists_every_finding_kind() -> None:
    """A finding kind the code can emit must validate: the schema's enum is the code's KINDS."""
    from traceml.diagnosis.findings import KINDS

    schema = json.loads(SCHEMA_PATH.read_text())
    enums = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            kind = node.get("properties", {}).get("kind") if isinstance(node.get("properties"), dict) else None
            if isinstance(kind, dict) and "enum" in kind:
                enums.append(set(kind["enum"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    assert enums, "no finding-kind enum found in the schema"
    for enum in enums:
        assert enum == set(KINDS), f"schema kinds differ from the code: {sorted(enum ^ set(KINDS))}"
