"""Flat summary keys (``traceml.summary`` / ``Recording.summary``) that W&B and MLflow take as they are."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

import replay
import traceml
from traceml.diagnosis.flat import MAX_SEPARATORS, flatten_summary, safe_part
from traceml.errors import ReplayError

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_traces"
#: mlflow's own rule for metric names (mlflow/utils/validation.py), with "/" as separator
KEY = re.compile(r"^traceml(/[A-Za-z0-9_.\-]+){1," + str(MAX_SEPARATORS) + "}$")


def _check_keys(flat: dict[str, object]) -> None:
    assert flat
    for key, value in flat.items():
        assert KEY.match(key), key
        assert type(value) in (int, float), (key, value)
        assert math.isfinite(value), key  # type: ignore[arg-type]


def test_recording_summary_is_flat_and_matches_the_nested_one() -> None:
    with replay.open(SAMPLES / "ddp_input_straggler.tml", progress=False) as rec:
        flat = rec.summary()
        nested = rec.summary(flat=False)
    _check_keys(flat)
    assert flat["traceml/steps/step/median_ms"] == nested["steps"]["overall"]["step"]["median_ms"]
    assert flat["traceml/rank1/dataloader/median_ms"] > flat["traceml/rank0/dataloader/median_ms"]
    assert flat["traceml/diagnosis/primary/STRAGGLER"] == 2  # critical
    assert flat["traceml/diagnosis/finding/INPUT_BOUND"] == 2
    assert flat["traceml/run/world_size"] == 2 and flat["traceml/run/ok"] == 1
    share = flat["traceml/steps/dataloader/share"]
    assert share == pytest.approx(
        nested["steps"]["overall"]["dataloader"]["median_ms"] / nested["steps"]["overall"]["step"]["median_ms"]
    )


def test_traceml_summary_reads_tml_json_dir_and_dict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_tml = traceml.summary(SAMPLES / "input_bound.tml")
    with replay.open(SAMPLES / "input_bound.tml", progress=False) as rec:
        nested = rec.summary(flat=False)
    (tmp_path / "summary.json").write_text(json.dumps(nested))
    assert traceml.summary(tmp_path / "summary.json") == from_tml
    assert traceml.summary(tmp_path) == from_tml
    assert traceml.summary(nested) == from_tml
    assert from_tml["traceml/diagnosis/primary/INPUT_BOUND"] == 2
    # no argument: the newest recording under ./traceml_runs
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ReplayError, match="no recording found under 'traceml_runs'"):
        traceml.summary()
    run = tmp_path / "traceml_runs" / "r1"
    run.mkdir(parents=True)
    (run / "run.tml").write_bytes((SAMPLES / "input_bound.tml").read_bytes())
    assert traceml.summary() == from_tml


def test_mlflow_and_wandb_accept_the_keys_as_they_are() -> None:
    flat = traceml.summary(SAMPLES / "compute_bound.tml")
    from mlflow.utils.validation import _validate_metric_name

    for key in flat:
        _validate_metric_name(key)
    _check_keys(flat)


def test_names_from_a_hostile_summary_are_reduced_and_bounded() -> None:
    summary = {
        "regions": [
            {"name": "../../etc/passwd", "median_ms": 1.0},
            {"name": "a/b", "median_ms": 2.0},
            {"name": "a b", "median_ms": 3.0},
            {"name": "\x1b[31m" + "x" * 500, "median_ms": float("nan")},
        ],
        "diagnosis": {"primary": {"kind": "A/B\nC", "severity": "warn"}, "findings": "not a list"},
        "steps": {"per_rank": [{"rank": "0; rm"}, {"rank": True}], "count": True},
    }
    flat = flatten_summary(summary)
    _check_keys(flat)
    assert flat["traceml/regions/etc_passwd/median_ms"] == 1.0
    assert flat["traceml/regions/a_b/median_ms"] == 2.0
    assert flat["traceml/regions/a_b_2/median_ms"] == 3.0  # two names that reduce alike stay apart
    assert flat["traceml/diagnosis/primary/A_B_C"] == 1
    assert not any(k.startswith("traceml/rank") for k in flat)
    assert len(safe_part("y" * 1000)) == 64 and safe_part("") == "_"
