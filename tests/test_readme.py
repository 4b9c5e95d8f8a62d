"""Every example in the README runs: the Python blocks for real, the command lines against the
sample traces (or, for the ones that train or serve, as parsed command lines)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SAMPLES = ROOT / "sample_traces"
TRACEML = str(Path(sys.executable).parent / "traceml")

pytestmark = pytest.mark.slow


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_the_readme_has_exactly_two_setup_commands_and_the_makefile_has_them() -> None:
    setup = README.split("## Set up", 1)[1].split("## ", 1)[0]
    commands = [
        line.split("#")[0].strip() for b in re.findall(r"```bash\n(.*?)```", setup, re.S) for line in b.splitlines()
    ]
    assert [c for c in commands if c] == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_trace_step_example_runs_and_records(tmp_path: Path) -> None:
    snippet = next(b for b in blocks("python") if "trace_step" in b)
    prelude = (
        "import torch\n"
        "torch.manual_seed(0)\n"
        "model = torch.nn.Linear(8, 4)\n"
        "optimizer = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "loader = torch.utils.data.DataLoader(torch.randn(64, 8), batch_size=8)\n"
    )
    script = tmp_path / "example.py"
    script.write_text(prelude + snippet)
    out = tmp_path / "run.tml"
    env = {"TRACEML_OUT": str(out), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from traceml.format import open_recording

    steps = open_recording(out).read_table("step_time")[0]["step"]
    assert list(steps) == list(range(8))


def test_the_replay_example_runs_on_a_sample() -> None:
    snippet = next(b for b in blocks("python") if "replay.open" in b)
    code = snippet.replace('"run.tml"', repr(str(SAMPLES / "compute_bound.tml")))
    code += "\nassert len(cols['step']) > 0 and 'forward_us' in cols\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_every_command_line_in_the_readme_works(tmp_path: Path) -> None:
    paths = {
        "traceml_runs/<run>/run.tml": SAMPLES / "compute_bound.tml",
        "run.tml": SAMPLES / "compute_bound.tml",
        "base.tml": SAMPLES / "compute_bound.tml",
        "new.tml": SAMPLES / "compute_bound.tml",
        "broken.tml": SAMPLES / "crashed_midway.tml",
        "fixed.tml": tmp_path / "fixed.tml",
        "trace.json": tmp_path / "trace.json",
        "run.prom": tmp_path / "run.prom",
        "parquet/": tmp_path / "parquet",
        "report/": tmp_path / "report",
    }
    lines = [ln.split("#")[0].strip() for b in blocks("bash") for ln in b.splitlines()]
    commands = [shlex.split(ln) for ln in lines if ln.startswith("traceml ")]
    assert {c[1] for c in commands} >= {"run", "replay", "report", "compare", "inspect", "recover", "export"}
    for argv in commands:
        argv = [str(paths.get(a, a)) for a in argv]
        if argv[1] == "run" or "--ui" in argv:  # trains or serves: the command line must parse
            r = subprocess.run([TRACEML, argv[1], "--help"], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            ours = argv[2:]
            script = next((i for i, a in enumerate(ours) if a.endswith((".py", ".tml"))), len(ours))
            for opt in (a for a in ours[:script] + ours[script + 1 :] if a.startswith("--")):
                if argv[1] == "run" and ours.index(opt) > script:
                    continue  # the script's own options pass through untouched
                assert opt in r.stdout, f"{opt} is not an option of traceml {argv[1]}"
            continue
        r = subprocess.run([TRACEML, *argv[1:]], capture_output=True, text=True, timeout=120)
        # recover: 3 when the crash lost data; compare: a sample against itself is EQUIVALENT (0)
        expected = (0, 3) if argv[1] == "recover" else (0,)
        assert r.returncode in expected, f"{argv}: {r.returncode}\n{r.stdout}\n{r.stderr}"
