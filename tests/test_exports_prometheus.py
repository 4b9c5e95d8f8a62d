"""``traceml export --format prometheus``: a textfile-collector file that prometheus_client parses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from traceml.exports.prometheus import escape_label, render_textfile, write_textfile

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_traces"


def _families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {f.name: [(s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


def _summary(**run: object) -> dict[str, object]:
    return {
        "run": {"id": "abc", "name": "demo", "duration_s": 12.5, "world_size": 2, "exit_code": 0, **run},
        "steps": {
            "count": 100,
            "throughput_steps_per_s": 50.0,
            "overall": {
                "step": {"median_ms": 20.0, "p95_ms": 30.0},
                "dataloader": {"median_ms": 5.0, "p95_ms": 6.0},
                "forward": {"median_ms": 10.0, "p95_ms": None},
            },
            "per_rank": [
                {"rank": 0, "count": 100, "phases": {"step": {"median_ms": 19.0, "p95_ms": 25.0}}},
                {"rank": 1, "count": 100, "phases": {"step": {"median_ms": 21.0, "p95_ms": 35.0}}},
            ],
        },
        "diagnosis": {
            "primary": {"kind": "INPUT_BOUND", "severity": "critical"},
            "findings": [{"kind": "INPUT_BOUND", "severity": "critical", "rank": None}],
        },
        "memory": {"per_rank": [{"rank": 0, "peak_rss_bytes": 1000, "peak_gpu_alloc_bytes": None}]},
        "system": {"gpus": [{"node_rank": 0, "gpu_idx": 1, "util_pct_mean": 80.0, "mem_used_max_bytes": 5}]},
        "integrity": {"complete": True, "lost": {"bytes": 0}},
    }


def test_hand_built_summary_gives_the_documented_series() -> None:
    fams = _families(render_textfile(_summary()))
    step = {(lab["rank"], lab["stat"]): v for lab, v in fams["traceml_step_time_seconds"]}
    assert step == {("0", "median"): 0.019, ("0", "p95"): 0.025, ("1", "median"): 0.021, ("1", "p95"): 0.035}
    shares = {lab["phase"]: v for lab, v in fams["traceml_phase_share_ratio"]}
    assert shares == {"dataloader": 0.25, "forward": 0.5}
    # a None p95 is left out, not written as NaN
    assert ({"run": "demo", "phase": "forward", "stat": "p95"}, pytest.approx(0.01)) not in fams[
        "traceml_phase_time_seconds"
    ]
    assert fams["traceml_throughput_steps_per_second"] == [({"run": "demo"}, 50.0)]
    assert fams["traceml_peak_memory_bytes"] == [({"run": "demo", "rank": "0", "kind": "rss"}, 1000.0)]
    assert fams["traceml_verdict"] == [({"run": "demo", "kind": "INPUT_BOUND", "severity": "critical"}, 1.0)]
    assert fams["traceml_verdict_severity"] == [({"run": "demo"}, 2.0)]
    assert fams["traceml_gpu_utilization_ratio"] == [({"run": "demo", "node": "0", "gpu": "1"}, 0.8)]
    assert fams["traceml_recording_complete"] == [({"run": "demo"}, 1.0)]


def test_label_values_from_the_recording_are_escaped() -> None:
    hostile = 'ev"il\\run\nname\x1b[31m} 1\n# TYPE x counter'
    text = render_textfile(_summary(name=hostile))
    # every line is a comment or one sample: nothing the name carried broke out of its label
    for line in text.splitlines():
        assert line.startswith(("# ", "traceml_")), line
    assert "\x1b" not in text
    fams = _families(text)
    (labels, _), *_ = fams["traceml_steps"]
    assert labels["run"] == 'ev"il\\run\nname[31m} 1\n# TYPE x counter'
    assert escape_label("x" * 1000) == "x" * 128


@pytest.mark.parametrize("trace", ["ddp_input_straggler.tml", "compute_bound.tml", "crashed_midway.tml"])
def test_cli_export_of_a_sample_trace_parses(tmp_path: Path, trace: str) -> None:
    out = tmp_path / "textfile" / "run.prom"
    out.parent.mkdir()
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "from traceml.cli import main; main()",
            "export",
            str(SAMPLES / trace),
            "--format",
            "prometheus",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    fams = _families(out.read_text(encoding="utf-8"))
    expected = json.loads((SAMPLES / "expected.json").read_text())["traces"][trace]
    ((labels, value),) = fams["traceml_verdict"]
    assert labels["kind"] == expected["primary"]["kind"] and value == 1
    ranks = {lab["rank"] for lab, _ in fams["traceml_step_time_seconds"]}
    assert ranks == {str(r) for r in range(expected["world_size"])}
    assert all(v > 0 for _, v in fams["traceml_step_time_seconds"])
    # nothing but the file itself is left in the collector's directory (the temporary file was renamed)
    assert [p.name for p in out.parent.iterdir()] == ["run.prom"]
    assert oct(out.stat().st_mode & 0o777) == "0o644"


def test_write_textfile_replaces_atomically_and_names_a_bad_path(tmp_path: Path) -> None:
    target = tmp_path / "a.prom"
    target.write_text("old\n")
    from traceml.errors import ExportError, OutputExistsError

    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_textfile("new 1\n", target)
    write_textfile("new 1\n", target, overwrite=True)
    assert target.read_text() == "new 1\n"

    with pytest.raises(ExportError, match="choose a writable -o path"):
        write_textfile("x 1\n", tmp_path / "missing-dir" / "a.prom")
