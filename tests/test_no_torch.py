"""The aggregator, replay, report, compare, inspect and export paths run with torch blocked.

Every child process here gets a ``sitecustomize`` that sets ``sys.modules["torch"] = None``,
so any ``import torch`` on those paths raises ImportError and the command fails."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from traceml.cli.launch_plan import free_port
from traceml.format import open_recording
from traceml.schema import PHASES, STEP_TIME, rows_to_columns
from traceml.transport import RankIdentity, TelemetryClient, batch, encode_columns, hello, rank_finished

pytestmark = pytest.mark.slow
SAMPLES = Path(__file__).resolve().parents[1] / "sample_traces"
BLOCKER = """
import sys
sys.modules["torch"] = None  # any torch import on this path now fails
"""


@pytest.fixture
def no_torch_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "block_torch"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "TRACEML_TOKEN": "nt-token"}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from traceml.cli import main; sys.argv = ['traceml', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)


def test_the_blocker_really_blocks_torch(no_torch_env: dict[str, str]) -> None:
    r = subprocess.run([sys.executable, "-c", "import torch"], env=no_torch_env, capture_output=True, text=True)
    assert r.returncode != 0 and "torch" in r.stderr


def test_inspect_export_report_compare_and_replay_without_torch(no_torch_env: dict[str, str], tmp_path: Path) -> None:
    base, new = SAMPLES / "compute_bound.tml", SAMPLES / "input_bound.tml"
    r = cli(no_torch_env, "inspect", str(base), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["integrity"]["status"] == "complete"
    r = cli(no_torch_env, "export", str(base), "--format", "chrome-trace", "-o", str(tmp_path / "t.json"))
    assert r.returncode == 0, r.stderr
    r = cli(no_torch_env, "report", str(new), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "rep" / "summary.json").read_text())["diagnosis"]["primary"]["kind"] == "INPUT_BOUND"
    r = cli(no_torch_env, "compare", str(base), str(base))
    assert r.returncode == 0, r.stderr  # a run against itself is EQUIVALENT
    r = cli(no_torch_env, "replay", str(base), "--speed", "max")
    assert r.returncode == 0, r.stderr
    assert "traceml" in r.stdout


def test_the_aggregator_process_records_without_torch(no_torch_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "run.tml"
    cmd = [sys.executable, "-m", "traceml.aggregator", "--port", str(port), "--run-id", "nt"]
    cmd += ["--expected-ranks", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=no_torch_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1].decode()
                assert time.monotonic() < deadline, "aggregator never listened"
                time.sleep(0.02)
        ident = RankIdentity(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, host="h", pid=1)
        client = TelemetryClient("127.0.0.1", port, hello("nt", "nt-token", ident))
        rows = [(s, 1_000 + s, 0, 500, *([50] * len(PHASES))) for s in range(25)]
        client.send(batch(1, {"step_time": encode_columns(STEP_TIME, rows_to_columns(STEP_TIME, rows))}))
        client.send(rank_finished("ok"))
        client.close(drain_timeout_s=10.0)
        assert proc.wait(timeout=60) == 0, proc.communicate()[1].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    rec = open_recording(out)
    assert rec.integrity["status"] == "complete"
    assert list(rec.read_table("step_time")[0]["step"]) == list(range(25))
