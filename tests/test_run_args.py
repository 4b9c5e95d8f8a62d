"""``traceml run``'s command line as torchrun users type it: torchrun spellings, -m, --, Slurm,
unknown options named, notes for options after SCRIPT, the shadowing ``traceml`` folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from traceml.cli import app, run_cmd
from traceml.cli.launch_plan import RunPlan, rank_env, shadowing_folders, training_command
from traceml.cli.run_args import first_host, parse_nnodes, resolve_nproc, rewrite, slurm_defaults
from traceml.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def script(tmp_path: Path) -> str:
    path = tmp_path / "train.py"
    path.write_text("print('hi')\n")
    return str(path)


@pytest.fixture
def plans(monkeypatch: pytest.MonkeyPatch) -> list[RunPlan]:
    seen: list[RunPlan] = []
    monkeypatch.setattr(run_cmd, "run_plan", lambda plan: seen.append(plan) or 0)
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    return seen


def test_torchrun_spellings_pass_through(script: str, plans: list[RunPlan]) -> None:
    argv = [
        "run", "--nproc_per_node=2", "--standalone", "--rdzv_backend", "c10d", "--rdzv-endpoint=localhost:0",
        "--rdzv-id", "job7", "--max-restarts", "3", "--nnodes", "1:4", "--no-record", script, "--lr", "1",
    ]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    (plan,) = plans
    assert plan.nproc_per_node == 2 and plan.nnodes == 1 and plan.nnodes_spec == "1:4"
    assert plan.script_args == ["--lr", "1"]
    cmd = training_command(plan)
    for arg in ("--standalone", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "--rdzv-id=job7",
                "--max-restarts=3", "--nnodes=1:4", "--nproc-per-node=2"):  # fmt: skip
        assert arg in cmd, (arg, cmd)
    assert cmd.index("--standalone") < cmd.index("traceml.integrations.executor")


def test_unknown_option_is_named_as_an_option(script: str, plans: list[RunPlan]) -> None:
    result = CliRunner().invoke(app, ["run", "--nproc-per-nod", "2", script])
    assert result.exit_code == 2 and not plans
    assert "traceml run: error: no such option: '--nproc-per-nod'" in result.output
    assert "script '--nproc-per-nod' not found" not in result.output


def test_module_and_double_dash(tmp_path: Path, plans: list[RunPlan], monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text("print('hi')\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "--no-record", "-m", "mypkg.train", "--epochs", "2"])
    assert result.exit_code == 0, result.output
    plan = plans[-1]
    assert plan.module and plan.script == "mypkg.train" and plan.script_args == ["--epochs", "2"]
    assert training_command(plan)[-5:] == ["traceml.integrations.executor", "-m", "mypkg.train", "--epochs", "2"]
    result = CliRunner().invoke(app, ["run", "--no-record", "--", "mypkg/train.py", "--no-record"])
    assert result.exit_code == 0, result.output
    assert plans[-1].script == "mypkg/train.py" and plans[-1].script_args == ["--no-record"]
    bad = CliRunner().invoke(app, ["run", "-m", "nosuchpkg.train"])
    assert bad.exit_code == 2 and "no module 'nosuchpkg'" in bad.output


def test_a_traceml_option_after_script_gets_a_note(script: str, plans: list[RunPlan]) -> None:
    result = CliRunner().invoke(app, ["run", "--no-record", script, "--nproc-per-node", "2"])
    assert result.exit_code == 0
    assert plans[0].script_args == ["--nproc-per-node", "2"] and plans[0].nproc_per_node == 1
    assert "note: --nproc-per-node after SCRIPT goes to the script" in result.output


def test_rewrite_and_spellings() -> None:
    known = {"--ui": True, "--no-record": False}
    assert rewrite(["--ui=web", "--no_record", "t.py", "-x"], known).args == [
        "--ui=web",
        "--no-record",
        "--",
        "t.py",
        "-x",
    ]
    with pytest.raises(ConfigError, match="torchrun's --no-python is not supported"):
        rewrite(["--no_python", "t.py"], known)
    with pytest.raises(ConfigError, match="--ui needs a value"):
        rewrite(["--ui"], known)
    assert resolve_nproc("3") == 3
    assert resolve_nproc("auto", gpus=0, cpus=6) == 6 and resolve_nproc("auto", gpus=2, cpus=6) == 2
    assert resolve_nproc("cpu", cpus=5) == 5 and resolve_nproc("gpu", gpus=8) == 8
    with pytest.raises(ConfigError, match="no GPU found"):
        resolve_nproc("gpu", gpus=0)
    with pytest.raises(ConfigError, match="expected a number, auto, gpu or cpu"):
        resolve_nproc("many")
    assert parse_nnodes("2") == (2, 2) and parse_nnodes("1:4") == (1, 4)
    with pytest.raises(ConfigError, match="MIN:MAX"):
        parse_nnodes("4:1")


def test_slurm_gives_nodes_node_rank_and_master(
    script: str, plans: list[RunPlan], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert first_host("gpu[03-05,09],cpu1") == "gpu03" and first_host("n1,n2") == "n1"
    env = {"SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_NTASKS": "2"}
    d = slurm_defaults(env)
    assert d is not None and (d.nnodes, d.node_rank, d.master_addr) == (2, 1, "node07") and not d.notes
    assert slurm_defaults({}) is None
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TRACEML_TOKEN", "job-secret")
    result = CliRunner().invoke(app, ["run", script])
    assert result.exit_code == 0, result.output
    (plan,) = plans
    assert (plan.nnodes, plan.node_rank, plan.master_addr) == (2, 1, "node07")
    assert plan.aggregator_host == "node07" and plan.aggregator_port == run_cmd.SLURM_AGGREGATOR_PORT
    # options on the command line win over Slurm's
    CliRunner().invoke(
        app, ["run", "--nnodes", "1", "--node-rank", "0", "--master-addr", "127.0.0.1", "--no-record", script]
    )
    assert (plans[-1].nnodes, plans[-1].node_rank) == (1, 0)


def test_disable_runs_without_aggregator_and_turns_ranks_off(script: str, plans: list[RunPlan]) -> None:
    result = CliRunner().invoke(app, ["run", "--disable", script])
    assert result.exit_code == 0, result.output
    (plan,) = plans
    assert plan.disabled and not plan.starts_aggregator and plan.out is None
    assert rank_env(plan, {})["TRACEML_DISABLED"] == "1"


def test_a_folder_named_traceml_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "traceml").mkdir()
    (tmp_path / "train.py").write_text("")
    monkeypatch.chdir(tmp_path)
    assert shadowing_folders("train.py", False) == [tmp_path / "traceml"]
    monkeypatch.chdir(ROOT)  # the checkout itself: its traceml/ is the package
    assert shadowing_folders(str(ROOT / "examples" / "demo_train.py"), False) == []


@pytest.mark.slow
def test_real_run_of_a_module_from_a_folder_with_a_traceml_folder(tmp_path: Path) -> None:
    """The shadowing case of the issue, end to end: cwd holds a folder named traceml."""
    (tmp_path / "traceml").mkdir()  # e.g. started from the checkout's parent
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(
        "import sys, traceml\n"
        "for i in range(5):\n"
        "    with traceml.trace_step():\n"
        "        pass\n"
        "print('args', sys.argv[1:])\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", "from traceml.cli import main; main()", "run", "--ui", "none", "--out",
         str(tmp_path / "r" / "run.tml"), "--nproc_per_node=1", "--standalone", "-m", "mypkg.train", "--x", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "args ['--x', '1']" in res.stdout
    assert "is named like the traceml package" in res.stderr
    from traceml.format import open_recording

    steps = open_recording(tmp_path / "r" / "run.tml").read_table("step_time")[0]["step"]
    assert len(steps) == 5
