"""``--log-to wandb|mlflow``: the real packages, offline (W&B offline mode, an MLflow local file store)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from traceml.errors import MissingDependencyError

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_traces"
pytestmark = pytest.mark.slow


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from traceml.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        timeout=180,
    )


@pytest.fixture
def mlflow_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An MLflow local file store under tmp_path (MLflow 3 wants the opt-in for a file store)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return {"MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}


def test_report_logs_into_a_new_mlflow_run(tmp_path: Path, mlflow_env: dict[str, str]) -> None:
    env = mlflow_env
    res = _cli("report", str(SAMPLES / "input_bound.tml"), "-o", str(tmp_path / "rep"), "--log-to", "mlflow", env=env)
    assert res.returncode == 0, res.stderr
    assert "into mlflow run" in res.stdout
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs(["0"])
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert run.data.metrics["traceml/steps/step/median_ms"] == summary["steps"]["overall"]["step"]["median_ms"]
    assert run.data.metrics["traceml/diagnosis/primary/INPUT_BOUND"] == 2.0
    assert run.data.tags["traceml.verdict"] == "INPUT_BOUND"
    assert run.data.tags["mlflow.runName"] == "input_bound"
    arts = sorted(a.path for a in client.list_artifacts(run.info.run_id, "traceml"))
    assert arts == ["traceml/report.html", "traceml/summary.json", "traceml/summary.md"]


def test_mlflow_run_id_logs_into_the_scripts_run(tmp_path: Path, mlflow_env: dict[str, str]) -> None:
    env = mlflow_env
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    script_run = client.create_run("0", run_name="my-training")
    client.log_metric(script_run.info.run_id, "loss", 0.5)
    res = _cli(
        "report",
        str(SAMPLES / "compute_bound.tml"),
        "-o",
        str(tmp_path / "rep"),
        "--log-to",
        "mlflow",
        env={**env, "MLFLOW_RUN_ID": script_run.info.run_id},
    )
    assert res.returncode == 0, res.stderr
    (run,) = client.search_runs(["0"])
    assert run.info.run_id == script_run.info.run_id and run.data.tags["mlflow.runName"] == "my-training"
    assert run.data.metrics["loss"] == 0.5 and run.data.tags["traceml.verdict"] == "COMPUTE_BOUND"


def _wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a .wandb file (a LevelDB-style log: 32 KiB blocks, 7-byte chunk headers)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            yield buf
            buf = b""


def test_report_logs_into_an_offline_wandb_run(tmp_path: Path) -> None:
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_DATA_DIR": str(tmp_path / "data"),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
        "WANDB_PROJECT": "traceml-test",
        "WANDB_SILENT": "true",
    }
    res = _cli("report", str(SAMPLES / "input_bound.tml"), "-o", str(tmp_path / "rep"), "--log-to", "wandb", env=env)
    assert res.returncode == 0, res.stderr
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    from wandb.proto import wandb_internal_pb2 as pb

    summary: dict[str, object] = {}
    artifacts = []
    run_name = ""
    for raw in _wandb_records(run_file):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "summary":
            summary.update({u.key: json.loads(u.value_json) for u in rec.summary.update if u.key})
        elif kind == "artifact":
            artifacts.append(rec.artifact)
        elif kind == "run":
            run_name = rec.run.display_name
    assert run_name == "input_bound"
    expected = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["traceml/steps/step/median_ms"] == expected["steps"]["overall"]["step"]["median_ms"]
    assert summary["traceml/verdict"] == "INPUT_BOUND" and summary["traceml/verdict_severity"] == "critical"
    (artifact,) = artifacts
    assert artifact.type == "traceml-report" and artifact.name == "traceml-input_bound"
    assert sorted(c.path for c in artifact.manifest.contents) == ["report.html", "summary.json", "summary.md"]


def test_live_pusher_is_fail_open() -> None:
    from traceml.exports.otlp import LivePusher

    calls = []

    def summary() -> dict[str, object]:
        calls.append(1)
        raise RuntimeError("a diagnosis bug")

    pusher = LivePusher(summary, "http://127.0.0.1:9", interval_s=0.1, timeout_s=0.5)  # nothing listens on 9
    pusher.start()
    import time

    time.sleep(0.35)
    pusher.stop({"run": {"duration_s": 1.0}})  # the final push fails too: logged, never raised
    assert calls and pusher.failures == 1 and pusher.pushes == 0


def test_live_pusher_backs_off_when_a_summary_is_expensive() -> None:
    import time

    from traceml.exports.otlp import MAX_DUTY, LivePusher

    calls = []

    def slow_summary() -> None:
        calls.append(time.monotonic())
        time.sleep(0.05)  # a big live store: the summary takes a while
        return None

    pusher = LivePusher(slow_summary, "http://127.0.0.1:9", interval_s=0.1)
    pusher.start()
    time.sleep(1.0)
    pusher.stop(None)
    # at a fixed 0.1 s interval there would be ~7 calls; backing off to >= 20 x 0.05 s leaves 1 or 2
    assert 1 <= len(calls) <= 2 and pusher.last_cost_s >= 0.05
    assert MAX_DUTY == 20


def test_wandb_run_id_logs_into_the_scripts_run(tmp_path: Path) -> None:
    """WANDB_RUN_ID: traceml resumes the run the script opened with the same id (offline here)."""
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_DATA_DIR": str(tmp_path / "data"),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
        "WANDB_SILENT": "true",
        "WANDB_RUN_ID": "scriptrun42",
    }
    res = _cli("report", str(SAMPLES / "compute_bound.tml"), "-o", str(tmp_path / "rep"), "--log-to", "wandb", env=env)
    assert res.returncode == 0, res.stderr
    assert "into wandb run scriptrun42" in res.stdout
    assert [p.name for p in (tmp_path / "wandb").glob("offline-run-*")][0].endswith("-scriptrun42")


def test_a_missing_package_names_the_pip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from traceml.exports.trackers import log_to

    for module, pip in (("wandb", "traceml-recorder[wandb]"), ("mlflow", "traceml-recorder[mlflow]")):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
        with pytest.raises(MissingDependencyError, match=rf"pip install '{pip.replace('[', '.').replace(']', '.')}'"):
            log_to(module, {"run": {"name": "x"}})


def test_an_unknown_tracker_is_a_usage_error_before_any_work(tmp_path: Path) -> None:
    res = _cli("report", str(SAMPLES / "input_bound.tml"), "-o", str(tmp_path / "rep"), "--log-to", "neptune", env={})
    assert res.returncode != 0
    assert "--log-to 'neptune': expected one of wandb, mlflow" in res.stderr
    assert not (tmp_path / "rep").exists()


def test_traceml_run_logs_to_mlflow_and_sends_otlp_while_and_after_the_training(
    tmp_path: Path, mlflow_env: dict[str, str]
) -> None:
    from mlflow import MlflowClient

    from tests.otlp_receiver import OtlpReceiver

    demo = str(ROOT / "examples" / "demo_train.py")
    with OtlpReceiver() as rx:
        res = subprocess.run(
            [sys.executable, "-c", "from traceml.cli import main; main()", "run", "--ui", "none",
             "--out", str(tmp_path / "r" / "run.tml"), "--run-name", "tiny", "--log-to", "mlflow", "--otlp", rx.url,
             "--json", "--otlp-interval", "0.3",
             demo, "--steps", "150", "--log-every", "0", "--input-cost", "0"],
            capture_output=True, text=True, cwd=tmp_path, timeout=240,
            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **mlflow_env},
        )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "r" / "report" / "report.html").is_file()
    summary = json.loads(res.stdout.strip().splitlines()[-1])  # --json: the summary is the last line
    assert summary["run"]["name"] == "tiny" and summary["steps"]["count"] > 0
    (run,) = MlflowClient(tracking_uri=mlflow_env["MLFLOW_TRACKING_URI"]).search_runs(["0"])
    assert run.data.tags["mlflow.runName"] == "tiny"
    assert run.data.metrics["traceml/steps/count"] > 0 and run.data.metrics["traceml/run/world_size"] == 1
    # the aggregator pushed while the run went on, and once more with the final summary
    assert len(rx.requests) >= 2, len(rx.requests)
    final = OtlpReceiver.points_of(rx.requests[-1])
    rank0 = [v for r, name, v, _ in final if name == "traceml.step.duration" and r.get("traceml.rank") == 0]
    assert len(rank0) == 2 and all(v > 0 for v in rank0)
    counts = [v for r, name, v, _ in final if name == "traceml.step.count" and "traceml.rank" not in r]
    assert counts == [summary["steps"]["count"]]
