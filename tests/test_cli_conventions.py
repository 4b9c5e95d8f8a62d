"""Conventions every ``traceml`` command shares: --version/-V, -h, completion, version --json,
``traceml runs``, the config file, --color."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from traceml.cli import app, run_cmd
from traceml.cli.launch_plan import RunPlan

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_traces"
COMMANDS = ("run", "inspect", "recover", "export", "replay", "report", "compare", "version", "runs")


def _cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "traceml", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=120,
    )


def test_version_flags_and_json() -> None:
    from traceml._version import __version__

    for flag in ("--version", "-V"):
        res = CliRunner().invoke(app, [flag])
        assert res.exit_code == 0 and res.output.strip() == f"traceml {__version__}"
    info = json.loads(CliRunner().invoke(app, ["version", "--json"]).output)
    assert info["traceml"] == __version__ and info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["torch"] and info["torch"].startswith("2.")  # from metadata: torch is not imported
    assert {"platform", "nccl", "cuda_driver", "torch_cuda", "gpus"} <= set(info)


@pytest.mark.parametrize("command", COMMANDS)
def test_dash_h_is_help_everywhere(command: str) -> None:
    res = CliRunner().invoke(app, [command, "-h"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output and "--help" in res.output


def test_shell_completion_lists_commands() -> None:
    # the shell is detected from the parent process, as a user's would be: run traceml under bash
    # (not exec'd: "; true" keeps bash alive as the parent), whatever process runs pytest
    shell = shutil.which("bash")
    assert shell is not None
    res = subprocess.run(
        [shell, "-c", '"$0" -m traceml --show-completion; true', sys.executable],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert res.returncode == 0 and "_traceml_completion" in res.stdout, res.stderr
    assert "complete -o default -F _traceml_completion traceml" in res.stdout
    words = subprocess.run(
        [sys.executable, "-m", "traceml"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "_TRACEML_COMPLETE": "complete_bash", "COMP_WORDS": "traceml ru",
             "COMP_CWORD": "1"},
        timeout=60,
    ).stdout.split()  # fmt: skip
    assert words == ["run", "runs"]


def test_runs_lists_recordings_newest_first(tmp_path: Path) -> None:
    runs = tmp_path / "traceml_runs"
    for when, (name, sample) in enumerate(
        (("old", "compute_bound.tml"), ("new", "input_bound.tml"), ("crashed", "crashed_midway.tml"), ("junk", None))
    ):
        (runs / name).mkdir(parents=True)
        if sample is None:
            (runs / name / "run.tml").write_bytes(b"not a recording")
        else:
            shutil.copy(SAMPLES / sample, runs / name / "run.tml")
        os.utime(runs / name / "run.tml", (1_000_000 + when, 1_000_000 + when))
    res = _cli("runs", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert [r["name"] for r in json.loads(res.stdout)] == ["junk", "crashed", "new", "old"]
    assert rows["new"]["verdict"] == "INPUT_BOUND" and rows["new"]["steps"] == 195
    assert rows["old"]["verdict"] == "COMPUTE_BOUND" and rows["old"]["status"] == "complete"
    assert rows["crashed"]["status"] == "recovered" and rows["crashed"]["steps"] > 0
    assert rows["junk"]["status"].startswith("unreadable")
    table = _cli("runs", cwd=tmp_path, env={"COLUMNS": "160"})
    assert table.returncode == 0 and "INPUT_BOUND (critical)" in table.stdout
    empty = _cli("runs", cwd=tmp_path / "traceml_runs" / "junk")
    assert empty.returncode == 0 and "no recordings under traceml_runs" in empty.stdout


def test_config_file_sets_defaults_and_the_command_line_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[RunPlan] = []
    monkeypatch.setattr(run_cmd, "run_plan", lambda plan: seen.append(plan) or 0)
    (tmp_path / "train.py").write_text("")
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.traceml.run]\nnproc-per-node = 2\nui = "none"\nno_record = true\n'
    )
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(app, ["run", "train.py"]).exit_code == 0
    assert seen[-1].nproc_per_node == 2 and seen[-1].ui == "none" and seen[-1].out is None
    assert CliRunner().invoke(app, ["run", "--nproc-per-node", "3", "train.py"]).exit_code == 0
    assert seen[-1].nproc_per_node == 3
    # traceml.toml wins over pyproject.toml; an unknown option is an error naming the file
    (tmp_path / "traceml.toml").write_text("[run]\nnproc_per_nodes = 2\n")
    bad = CliRunner().invoke(app, ["run", "train.py"])
    assert bad.exit_code == 2 and "traceml.toml: [run] nproc_per_nodes is not an option of traceml run" in bad.output
    (tmp_path / "traceml.toml").write_text("[rn]\nui = 'none'\n")
    bad = CliRunner().invoke(app, ["run", "train.py"])
    assert bad.exit_code == 2 and "[rn] is not a traceml command" in bad.output
    (tmp_path / "traceml.toml").write_text("[run\n")
    bad = CliRunner().invoke(app, ["run", "train.py"])
    assert bad.exit_code == 2 and "is not valid TOML" in bad.output


def test_color_never_sets_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "")  # recorded: the test's own change is undone at teardown
    CliRunner().invoke(app, ["--color", "never", "version"])
    assert os.environ.get("NO_COLOR") == "1"
    res = CliRunner().invoke(app, ["--color", "sometimes", "version"])
    assert res.exit_code == 2 and "expected one of auto, always, never" in res.output


def test_inspect_check_exits_3_on_a_damaged_or_recovered_file() -> None:
    assert CliRunner().invoke(app, ["inspect", "--check", str(SAMPLES / "compute_bound.tml")]).exit_code == 0
    crashed = CliRunner().invoke(app, ["inspect", "--check", "--json", str(SAMPLES / "crashed_midway.tml")])
    assert crashed.exit_code == 3 and json.loads(crashed.stdout)["integrity"]["status"] == "recovered"
    # without --check, showing a damaged file is a success
    assert CliRunner().invoke(app, ["inspect", "--json", str(SAMPLES / "crashed_midway.tml")]).exit_code == 0


def test_report_json_and_plotly_js_directory(tmp_path: Path) -> None:
    res = _cli("report", str(SAMPLES / "input_bound.tml"), "-o", str(tmp_path / "a"), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)  # stdout is the summary and nothing else
    assert summary["diagnosis"]["primary"]["kind"] == "INPUT_BOUND"
    inline = (tmp_path / "a" / "report.html").stat().st_size
    res = _cli("report", str(SAMPLES / "input_bound.tml"), "-o", str(tmp_path / "b"), "--plotly-js", "directory")
    assert res.returncode == 0, res.stderr
    html = (tmp_path / "b" / "report.html").read_text()
    assert '<script src="plotly.min.js"' in html and "Plotly" not in html[:2000]
    shared = tmp_path / "b" / "plotly.min.js"
    assert shared.stat().st_size > 1_000_000 and len(html) < inline - 1_000_000
    assert f"wrote {shared}" in res.stdout
    bad = _cli("report", str(SAMPLES / "input_bound.tml"), "-o", str(tmp_path / "c"), "--plotly-js", "cdn")
    assert bad.returncode == 2 and "expected inline, directory, or a script src ending in .js" in bad.stderr
    assert not (tmp_path / "c").exists()  # a usage error writes nothing
    # several reports share one copy: a src ending in .js is referenced as given and not written
    for name in ("d", "e"):
        res = _cli("report", str(SAMPLES / "input_bound.tml"), "-o", str(tmp_path / name), "--plotly-js", "../p.js")
        assert res.returncode == 0, res.stderr
        html = (tmp_path / name / "report.html").read_text()
        assert '<script src="../p.js"' in html and len(html) < inline - 1_000_000
        assert not (tmp_path / name / "plotly.min.js").exists()
    hostile = _cli("report", str(SAMPLES / "input_bound.tml"), "-o", str(tmp_path / "f"), "--plotly-js", '"><x>.js')
    assert hostile.returncode == 0, hostile.stderr
    assert '<script src="&quot;&gt;&lt;x&gt;.js"' in (tmp_path / "f" / "report.html").read_text()


def test_compare_json_prints_the_comparison() -> None:
    sample = str(SAMPLES / "compute_bound.tml")
    res = CliRunner().invoke(app, ["compare", sample, sample, "--json"])
    assert res.exit_code in (0, 3), res.output  # the same run twice: never a regression
    doc = json.loads(res.stdout)
    assert isinstance(doc, dict) and doc


def test_quiet_leaves_out_progress_lines_but_not_errors(tmp_path: Path) -> None:
    args = ("export", str(SAMPLES / "input_bound.tml"), "--format", "prometheus", "-o", str(tmp_path / "a.prom"))
    loud = _cli(*args)
    assert loud.returncode == 0 and loud.stdout.startswith("wrote ")
    quiet = _cli("-q", *args, "--overwrite")
    assert quiet.returncode == 0 and quiet.stdout == "" and (tmp_path / "a.prom").stat().st_size > 0
    failed = _cli("-q", *args)  # exists, no --overwrite: the error is still said
    assert failed.returncode == 1 and "already exists" in failed.stderr
