"""Nothing is written outside the output a command was given, and nothing is overwritten unasked
(docs/security.md, "Opening recordings from others"; docs/cli.md).  Hostile table names reach
``traceml export`` from a real recording; ``report``, ``compare``, ``recover`` and ``run --out``
refuse an existing output unless ``--overwrite``."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
from hostile import HOSTILE_NAMES, write_hostile
from typer.testing import CliRunner

from traceml.cli import app
from traceml.cli.launch_plan import plan_run
from traceml.errors import OutputError, OutputExistsError
from traceml.outpaths import MAX_NAME_CHARS, OutputDir, check_new_file, open_new_file, safe_filename

runner = CliRunner()


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.mark.parametrize("name", [*HOSTILE_NAMES, "", ".", "...", "COM1.csv", "lpt9", " CON ", "ÄÖ/ü", "a" * 1000])
def test_safe_filename_is_one_plain_name(name: str) -> None:
    out = safe_filename(name, ".csv")
    assert out.endswith(".csv") and len(out) <= MAX_NAME_CHARS
    assert "/" not in out and "\\" not in out and not out.startswith(".") and out not in (".", "..")
    assert all(c.isprintable() for c in out) and not any(c in out for c in '<>:"|?*[]` ')
    assert out.split(".")[0].upper() not in {"CON", "PRN", "AUX", "NUL", "COM1", "LPT9"}
    assert Path(out).name == out and not Path(out).is_absolute()


def test_safe_filename_keeps_plain_names_and_separates_changed_ones() -> None:
    assert safe_filename("step_time", ".csv") == "step_time.csv"
    assert safe_filename("a/b", ".csv") != safe_filename("a_b", ".csv")  # a changed name carries its hash
    assert safe_filename("a/b", ".csv") == safe_filename("a/b", ".csv")  # and the same one each time


def test_output_dir_claims_unique_names_case_insensitively(tmp_path: Path) -> None:
    out = OutputDir(tmp_path / "o")
    paths = [out.claim(n, ".csv") for n in ("Step", "step", "STEP", "step")]
    assert len({p.name.casefold() for p in paths}) == 4
    assert all(p.parent == tmp_path / "o" for p in paths)


def test_open_never_writes_through_a_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    out = OutputDir(tmp_path / "o", overwrite=True)
    (tmp_path / "o").mkdir()
    path = out.claim("t", ".csv")
    os.symlink(outside, path)
    with pytest.raises(OutputError, match="symbolic link"):
        out.open(path)
    assert outside.read_text() == "keep"
    dangling = out.claim("u", ".csv")
    os.symlink(tmp_path / "nowhere.txt", dangling)
    with pytest.raises(OutputError, match="symbolic link"):
        out.open(dangling)
    assert not (tmp_path / "nowhere.txt").exists()


def test_new_file_is_exclusive_unless_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    with open_new_file(path, overwrite=False) as f:
        f.write("one")
    with pytest.raises(OutputExistsError, match="already exists.*--overwrite"):
        open_new_file(path, overwrite=False)
    with open_new_file(path, overwrite=True) as f:
        f.write("two")
    assert path.read_text() == "two"
    with pytest.raises(OutputError, match="is a directory"):
        check_new_file(tmp_path, overwrite=True)


@pytest.fixture(scope="module")
def hostile_tables(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hostile(tmp_path_factory.mktemp("hostile") / "run.tml", tables=HOSTILE_NAMES, text="\x1b[31mx")


def test_export_csv_with_hostile_table_names_stays_inside(hostile_tables: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    out = work / "out" / "a" / "b"
    out.mkdir(parents=True)
    result = runner.invoke(app, ["export", str(hostile_tables), "--format", "csv", "-o", str(out)])
    assert result.exit_code == 0, result.output
    written = files_under(tmp_path)
    assert written and all(p.parent == out for p in written), sorted(map(str, written))
    assert not Path("/tmp/x.csv").exists() or Path("/tmp/x.csv").stat().st_mtime < hostile_tables.stat().st_mtime
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "step_time.csv" in result.output
    # every table that has rows got its own file, a renamed one says which table it holds
    assert len(written) == 1 + len(HOSTILE_NAMES)
    assert "(table '..\\x2f" not in result.output  # names are shown escaped, never as raw bytes
    # a second export refuses before writing anything, --overwrite replaces
    again = runner.invoke(app, ["export", str(hostile_tables), "--format", "csv", "-o", str(out)])
    assert again.exit_code == 1 and "already exists" in again.stderr and "--overwrite" in again.stderr
    again = runner.invoke(app, ["export", str(hostile_tables), "--format", "csv", "-o", str(out), "--overwrite"])
    assert again.exit_code == 0, again.output
    assert files_under(tmp_path) == written


def test_export_chrome_trace_refuses_existing_file(hostile_tables: Path, tmp_path: Path) -> None:
    out = tmp_path / "trace.json.gz"  # the trace is gzipped by default
    out.write_text("precious")
    result = runner.invoke(app, ["export", str(hostile_tables), "--format", "chrome-trace", "-o", str(out)])
    assert result.exit_code == 1 and "already exists" in result.stderr
    assert out.read_text() == "precious"
    result = runner.invoke(
        app, ["export", str(hostile_tables), "--format", "chrome-trace", "-o", str(out), "--overwrite"]
    )
    assert result.exit_code == 0 and gzip.decompress(out.read_bytes()).startswith(b"{")


def test_recover_refuses_existing_file(hostile_tables: Path, tmp_path: Path) -> None:
    out = tmp_path / "clean.tml"
    out.write_bytes(b"precious")
    result = runner.invoke(app, ["recover", str(hostile_tables), "-o", str(out)])
    assert result.exit_code == 1 and "already exists" in result.stderr and out.read_bytes() == b"precious"
    result = runner.invoke(app, ["recover", str(hostile_tables), "-o", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] != b"prec"


def test_report_and_compare_refuse_existing_files(hostile_tables: Path, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    assert runner.invoke(app, ["report", str(hostile_tables), "--out", str(out)]).exit_code == 0
    before = {p: p.read_bytes() for p in files_under(out)}
    result = runner.invoke(app, ["report", str(hostile_tables), "--out", str(out)])
    assert result.exit_code == 1 and "already exists" in result.stderr and "--overwrite" in result.stderr
    assert {p: p.read_bytes() for p in files_under(out)} == before
    assert runner.invoke(app, ["report", str(hostile_tables), "--out", str(out), "--overwrite"]).exit_code == 0

    cmp_out = tmp_path / "cmp"
    cmp_out.mkdir()
    (cmp_out / "compare.md").write_text("precious")
    args = ["compare", str(hostile_tables), str(hostile_tables), "--out", str(cmp_out), "--resamples", "200"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "compare.md already exists" in result.stderr
    assert (cmp_out / "compare.md").read_text() == "precious" and not (cmp_out / "compare.html").exists()
    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code in (0, 3), result.output
    assert (cmp_out / "compare.md").read_text() != "precious"


def test_report_out_that_is_a_file_is_a_clear_error(hostile_tables: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(app, ["report", str(hostile_tables), "--out", str(blocker)])
    assert result.exit_code == 1 and "is a file; expected a directory" in result.stderr


def test_run_name_that_exists_gets_a_suffix(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("pass\n")
    runs = tmp_path / "runs"
    first = plan_run(str(script), run_name="baseline", runs_dir=str(runs))
    assert first.run_name == "baseline" and not first.renamed_from
    (runs / "baseline").mkdir(parents=True)
    (runs / "baseline-2").mkdir()
    second = plan_run(str(script), run_name="baseline", runs_dir=str(runs))
    assert second.run_name == "baseline-3" and second.renamed_from == "baseline"
    assert second.out == runs / "baseline-3" / "run.tml"


def test_run_out_that_exists_is_refused(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("pass\n")
    out = tmp_path / "run.tml"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        plan_run(str(script), out=str(out))
    assert plan_run(str(script), out=str(out), overwrite=True).out == out
    # other nodes do not record: nothing to refuse there
    plan = plan_run(str(script), out=str(out), nnodes=2, node_rank=1, token="t", aggregator_port=1)
    assert plan.out is None


def test_run_cli_refuses_existing_out_before_starting(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("raise SystemExit('must not run')\n")
    out = tmp_path / "run.tml"
    out.write_bytes(b"precious")
    result = runner.invoke(app, ["run", "--ui", "none", "--out", str(out), str(script)])
    assert result.exit_code == 2 and "already exists" in result.stderr and "--overwrite" in result.stderr
    assert out.read_bytes() == b"precious" and not (tmp_path / "stdout.log").exists()


@pytest.mark.slow
def test_run_twice_with_one_run_name_keeps_both_recordings(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text("print('trained')\n")
    traceml = str(Path(sys.executable).parent / "traceml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACEML_")}
    outputs = []
    for _ in range(2):
        proc = subprocess.run(
            [traceml, "run", "--ui", "none", "--run-name", "baseline", str(script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc)
    runs = tmp_path / "traceml_runs"
    assert (runs / "baseline" / "run.tml").is_file() and (runs / "baseline-2" / "run.tml").is_file()
    assert "exists; this run is baseline-2 (nothing is overwritten)" in outputs[1].stderr
    assert "exists" not in outputs[0].stderr
    assert (runs / "baseline" / "stdout.log").read_text() == "trained\n"
