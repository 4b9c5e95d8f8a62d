"""``traceml replay`` as a user runs it: the real console script in a child process."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from traceml.format import TmlWriter
from traceml.testing.synthetic import rank_infos, run_meta, synthetic_run, write_recording

TRACEML = str(Path(sys.executable).with_name("traceml"))
EXIT = {"exit_code": 0, "status": "ok", "duration_s": 4.0, "signal": ""}


def traceml(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TRACEML, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "run.tml"
    run = synthetic_run(ranks=2, steps=400, seed=5, sample_every=20)
    write_recording(
        path,
        run,
        attachments={"ranks": {"ranks": rank_infos(run)}, "exit": EXIT},
        chunk_steps=100,
        segment_max_bytes=8 << 10,
    )
    return path


def test_speed_max_prints_the_end_state_and_the_summary(tml: Path) -> None:
    out = traceml("replay", str(tml), "--speed", "max", "--width", "100")
    assert out.returncode == 0, out.stderr
    assert "╭─ traceml ─" in out.stdout and "traceml summary" in out.stdout
    assert "finished" in out.stdout and "step 399" in out.stdout and "ranks 2/2" in out.stdout
    assert "note:" not in out.stderr


def test_a_step_window(tml: Path) -> None:
    out = traceml("replay", str(tml), "--speed", "max", "--width", "100", "--from", "step:100", "--to", "step:199")
    assert out.returncode == 0, out.stderr
    assert "step 199" in out.stdout
    from typer.testing import CliRunner

    from traceml.cli import app

    same = CliRunner().invoke(
        app, ["replay", str(tml), "--speed", "max", "--width", "100", "--from-step", "100", "--to-step", "199"]
    )
    assert same.exit_code == 0 and same.stdout == out.stdout


def test_a_crashed_recording_replays_with_a_note(tml: Path, tmp_path: Path) -> None:
    crashed = tmp_path / "crashed.tml"
    data = tml.read_bytes()
    crashed.write_bytes(data[: len(data) * 2 // 3])
    out = traceml("replay", str(crashed), "--speed", "max", "--width", "100")
    assert out.returncode == 0, out.stderr
    assert "incomplete" in out.stdout
    assert "note:" in out.stderr and "did not finish" in out.stderr


def test_a_bad_ui_is_a_usage_error_listing_the_choices(tml: Path) -> None:
    from typer.testing import CliRunner

    from traceml.cli import app

    out = CliRunner().invoke(app, ["replay", str(tml), "--ui", "gui"])
    assert out.exit_code == 2 and "Invalid value for '--ui'" in out.stderr and "'gui' is not one of" in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.tml"], "not found"),
        (["{tml}", "--from", "yesterday"], "--from 'yesterday': expected seconds"),
        (["{tml}", "--speed", "0"], "--speed '0'"),
        (["{tml}", "--compare", "{tml}"], "--compare needs --ui web"),
        (["{tml}", "--from", "5", "--from-step", "3"], "not both"),
        (["{tml}", "--ui", "web", "--from", "5"], "drag across a step axis"),
    ],
)
def test_errors_say_what_to_change(tml: Path, tmp_path: Path, args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from traceml.cli import app

    argv = [a.format(tml=tml) if a != "missing.tml" else str(tmp_path / a) for a in args]
    out = CliRunner().invoke(app, ["replay", *argv])
    assert out.exit_code == (1 if args == ["missing.tml"] else 2), out.output  # file error 1, usage error 2
    assert message in out.stderr and out.stderr.startswith("traceml replay: error: ")
    assert out.exception is None or isinstance(out.exception, SystemExit)


def test_help_documents_the_window_syntax() -> None:
    from typer.testing import CliRunner

    from traceml.cli import app

    out = CliRunner().invoke(app, ["replay", "--help"], terminal_width=200)
    assert out.exit_code == 0
    flat = " ".join(out.stdout.split())
    for flag in (
        "--ui",
        "--speed",
        "--from",
        "--to",
        "--from-step",
        "--to-step",
        "--follow",
        "--port",
        "--host",
        "--compare",
    ):
        assert flag in flat
    assert "step:" in flat


def test_follow_tails_a_growing_file_and_stops_at_its_footer(tmp_path: Path) -> None:
    path = tmp_path / "growing.tml"
    run = synthetic_run(ranks=1, steps=200, seed=6)
    cols = run[0]["step_time"]
    with TmlWriter(path, run_meta=run_meta(ranks=1), segment_max_bytes=1024, fsync_interval_s=None) as writer:
        writer.append(0, "step_time", {k: v[:100] for k, v in cols.items()})
        writer.tick()
        proc = subprocess.Popen(
            [TRACEML, "replay", str(path), "--follow", "--width", "100"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(0.5)  # let it start on the partial file (not a timing assertion: either order works)
            writer.append(0, "step_time", {k: v[100:] for k, v in cols.items()})
            writer.attach("exit", EXIT)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "traceml summary" in stdout and "200 rank-steps" in stdout


def test_web_serves_the_dashboard_until_interrupted(tml: Path) -> None:
    proc = subprocess.Popen(
        [TRACEML, "replay", str(tml), "--ui", "web", "--port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as a terminal delivers it, whatever this test process inherited
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stderr is not None
        line = ""
        deadline = time.monotonic() + 60
        while "http://" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, f"no URL announced: {line!r}"
        with urllib.request.urlopen(match.group(0) + "_dash-layout", timeout=30) as resp:
            layout = json.dumps(json.loads(resp.read()))
        assert "fig-rank-steps" in layout and "rank-filter" in layout
        # keep reading stderr, so that nothing the server writes can block it on a full pipe
        tail: list[str] = []
        reader = threading.Thread(target=lambda: tail.extend(proc.stderr or ()), daemon=True)
        reader.start()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("no exit 30 s after Ctrl-C; stderr: " + "".join(tail)[-2000:]) from None
        reader.join(5)
        assert proc.returncode == 0, "".join(tail)[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_web_refuses_a_busy_port_before_loading(tml: Path) -> None:
    import socket

    from typer.testing import CliRunner

    from traceml.cli import app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        out = CliRunner().invoke(app, ["replay", str(tml), "--ui", "web", "--port", str(port)])
    assert out.exit_code == 1
    assert "choose another --port" in out.stderr


def test_the_console_script_exists_and_python_m_replay_works(tml: Path) -> None:
    assert shutil.which(TRACEML) is not None
    out = subprocess.run(
        [sys.executable, "-m", "replay", str(tml), "--speed", "max", "--width", "100"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "traceml summary" in out.stdout
