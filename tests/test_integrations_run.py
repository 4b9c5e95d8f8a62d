"""Trainers traced with no code change, for real: ``traceml run --ui none --out run.tml`` on the
test scripts (plain ``transformers.Trainer`` / ``lightning.Trainer``, no traceml import), then
the recording read back with ``traceml.format.open_recording``.

The runs start together (each is seconds of imports on this machine) in one module-scoped
fixture that waits for all of them; the tests check one run each.  (TRACEML_NO_AUTO_INTEGRATIONS,
which ``traceml run`` passes to the ranks, is checked on the executor in
test_integrations_imports.py.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from traceml.format import open_recording

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
SCRIPTS = HERE / "scripts"
TRACEML = str(Path(sys.executable).parent / "traceml")
MS = 1000  # µs
RUN_TIMEOUT_S = 400


def _installed(*names: str) -> bool:
    return all(importlib.util.find_spec(n) is not None for n in names)


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    out: Path

    def line(self, prefix: str) -> Any:
        for line in self.stdout.splitlines():
            if line.startswith(prefix + " "):
                return json.loads(line[len(prefix) + 1 :])
        raise AssertionError(f"no {prefix!r} line in the run's output:\n{self.stdout}\n{self.stderr}")

    def steps(self) -> list[dict[str, int]]:
        table = open_recording(self.out).read_table("step_time")
        assert set(table) <= {0}, table.keys()
        cols = table.get(0)
        if cols is None:
            return []
        n = len(cols["step"])
        return [{k: int(v[i]) for k, v in cols.items()} for i in range(n)]


RUNS: dict[str, tuple[list[str], dict[str, str]]] = {
    # 4 optimizer steps of 2 micro-batches; evaluation after steps 2 and 4 fetching 8 items x 60 ms
    "hf": (
        [
            str(SCRIPTS / "integ_hf_train.py"),
            "--accum",
            "2",
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--eval-sleep",
            "0.06",
        ],
        {},
    ),
    # 8 batches, accumulate 2; validation (8 items x 60 ms) as sanity check, after batch 3 (inside a window), after 6
    "lightning": (
        [
            str(SCRIPTS / "integ_lightning_train.py"),
            "--accum",
            "2",
            "--batches",
            "8",
            "--val-every",
            "3",
            "--val-sleep",
            "0.06",
        ],
        {},
    ),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    base = tmp_path_factory.mktemp("integ_runs")
    hf = _installed("transformers", "accelerate")
    wanted = {"hf": hf, "lightning": _installed("lightning")}
    procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    with contextlib.ExitStack() as files:
        try:
            for name, (argv, extra_env) in RUNS.items():
                if not wanted[name]:
                    continue
                cwd = base / name
                cwd.mkdir()
                env = {k: v for k, v in os.environ.items() if not k.startswith("TRACEML_")}
                env.update(
                    extra_env,
                    HF_HUB_OFFLINE="1",
                    TRANSFORMERS_OFFLINE="1",
                    PYTHONWARNINGS="ignore",
                    OMP_NUM_THREADS="1",
                )
                out = cwd / "run.tml"
                cmd = [TRACEML, "run", "--ui", "none", "--out", str(out), *argv]
                so = files.enter_context(open(cwd / "stdout.txt", "wb"))
                se = files.enter_context(open(cwd / "stderr.txt", "wb"))
                procs[name] = (subprocess.Popen(cmd, cwd=cwd, env=env, stdout=so, stderr=se), out)
            codes = {name: proc.wait(timeout=RUN_TIMEOUT_S) for name, (proc, _) in procs.items()}
        finally:
            for proc, _ in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return {
        name: Run(codes[name], (out.parent / "stdout.txt").read_text(), (out.parent / "stderr.txt").read_text(), out)
        for name, (_, out) in procs.items()
    }


def check_phases(r: dict[str, int], micro: int) -> None:
    """Script defaults: forward 4 ms, backward 3 ms, optimizer 2 ms, batch copy 3 ms."""
    assert r["failed"] == 0, r
    assert r["forward_us"] >= micro * 4 * MS, r
    assert r["backward_us"] >= micro * 3 * MS, r
    assert r["optimizer_us"] >= 2 * MS, r
    assert r["h2d_us"] >= micro * 3 * MS, r
    phases = sum(r[f"{p}_us"] for p in ("dataloader", "h2d", "forward", "backward", "optimizer"))
    assert r["residual_us"] >= 0 and phases <= r["step_us"], r


@pytest.mark.skipif(not _installed("transformers", "accelerate"), reason="needs the [hf] extra")
def test_hf_trainer_is_traced_with_no_code_change(runs: dict[str, Run]) -> None:
    run = runs["hf"]
    assert run.code == 0, run.stderr[-4000:]
    assert run.line("ATTACHED") == ["TraceMLCallback"]
    result = run.line("RESULT")
    assert result["optimizer_steps"] == 4 and result["evaluations"] == [2, 4]
    steps = run.steps()
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    for r in steps:
        check_phases(r, micro=2)
        assert r["dataloader_us"] < 8 * 60 * MS and r["step_us"] < 8 * 60 * MS, r  # evaluation not in a step


@pytest.mark.skipif(not _installed("lightning"), reason="needs the [lightning] extra")
def test_lightning_trainer_is_traced_with_no_code_change(runs: dict[str, Run]) -> None:
    run = runs["lightning"]
    assert run.code == 0, run.stderr[-4000:]
    assert run.line("ATTACHED") == ["TraceMLCallback"]
    result = run.line("RESULT")
    assert result["optimizer_steps"] == 4 and result["batches"] == 8 and result["validations"] == 3
    steps = run.steps()
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    for r in steps:
        check_phases(r, micro=2)
        assert r["dataloader_us"] < 8 * 60 * MS and r["step_us"] < 8 * 60 * MS, r  # validation not in a step
