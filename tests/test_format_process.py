"""Real processes and real failures: a writer killed with SIGKILL, a reader following a file
another thread or process is writing, a writer hitting a full disk (RLIMIT_FSIZE) or EIO."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_format_roundtrip import FakeClock, assert_columns_equal, batches_by_stream, step_columns, writer

from traceml.errors import WriterClosedError
from traceml.format import TmlWriter, open_recording

#: a writer process: appends 5 step rows per rank per loop and prints "appended written" after each
WRITER_SCRIPT = """
import sys, time
import numpy as np
sys.path.insert(0, {tests!r})
from test_format_roundtrip import step_columns
from traceml.format import TmlWriter

path, loops, close = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "close"
w = TmlWriter(path, run_meta={{"run_id": "proc"}}, segment_max_age_s=0.05, checkpoint_every_segments=4)
step = 0
for _ in range(loops):
    for rank in range(2):
        w.append(rank, "step_time", step_columns(step, 5, rank))
    step += 5
    print(step * 2, w.rows_written, flush=True)
    time.sleep(0.002)
    w.tick()
if close:
    w.close(summary={{"steps": step}})
    print("closed", flush=True)
else:
    time.sleep(60)
"""


def start_writer(path: Path, loops: int, close: bool) -> subprocess.Popen[str]:
    script = WRITER_SCRIPT.format(tests=str(Path(__file__).parent))
    return subprocess.Popen(
        [sys.executable, "-c", script, str(path), str(loops), "close" if close else "stay"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigkilled_writer_leaves_a_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "killed.tml"
    proc = start_writer(path, loops=100_000, close=False)
    try:
        assert proc.stdout is not None
        written = 0
        while written < 3000:  # a dozen segments and a few checkpoints are on disk
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else "writer exited"
            appended, written = map(int, line.split())
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    for line in rest.splitlines():  # what it printed before the kill, not read yet
        appended, written = map(int, line.split())
    with open_recording(path) as r:  # no recovery step
        integrity = r.integrity
        data = r.read_table("step_time")
        assert r.header["run_id"] == "proc"
    assert integrity["status"] == "recovered"
    assert "writer did not finish" in integrity["message"]
    rows = sum(len(cols["step"]) for cols in data.values())
    # everything in a closed segment survived; at most the open segment (plus the append the
    # kill interrupted) is missing
    assert written <= rows <= appended + 10
    for rank, cols in data.items():
        np.testing.assert_array_equal(cols["step"], np.arange(len(cols["step"])))  # a prefix, no gaps
        assert_columns_equal(cols, step_columns(0, len(cols["step"]), rank))


def test_follow_a_file_another_process_writes(tmp_path: Path) -> None:
    path = tmp_path / "live.tml"
    proc = start_writer(path, loops=150, close=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # the header is on disk once the first append returned
        got: list[Any] = []
        with open_recording(path, follow=True) as r:
            got.extend(r.iter_batches())
            polls = 0
            deadline = time.monotonic() + 60
            while r.integrity["status"] != "complete":
                got.extend(r.poll())
                polls += 1
                assert time.monotonic() < deadline, "the writer never finished"
                time.sleep(0.01)
            got.extend(r.poll())
            attachments = r.attachments
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert polls > 1
    streams = batches_by_stream(got)
    assert set(streams) == {(0, "step_time"), (1, "step_time")}
    for rank in range(2):
        assert_columns_equal(streams[(rank, "step_time")], step_columns(0, 750, rank))
    assert attachments["summary"] == {"steps": 750}


def test_follow_a_file_another_thread_writes(tmp_path: Path) -> None:
    path = tmp_path / "thread.tml"
    clock = FakeClock()
    w = writer(path, clock, segment_max_age_s=1.0, checkpoint_every_segments=3)
    released = threading.Event()
    progress = threading.Semaphore(0)

    def produce() -> None:
        for i in range(40):
            w.append(i % 3, "step_time", step_columns(i * 2, 2, i % 3))
            if i % 4 == 3:
                w.attach("progress", {"i": i})
            clock.advance(0.4)
            w.tick()
            progress.release()
        released.wait(10)
        w.close(summary={"done": True})

    thread = threading.Thread(target=produce, name="tml-producer")
    got: list[Any] = []
    with open_recording(path, follow=True) as r:
        thread.start()
        try:
            for _ in range(40):
                assert progress.acquire(timeout=10)
                got.extend(r.poll())
            assert r.integrity["status"] == "recovered"  # no footer yet
            released.set()
        finally:
            released.set()
            thread.join(10)
        got.extend(r.poll())
        assert r.integrity["status"] == "complete"
        assert r.attachments["progress"] == {"i": 39}
        assert r.poll() == []
    streams = batches_by_stream(got)
    for rank in range(3):
        expected = [step_columns(i * 2, 2, rank) for i in range(rank, 40, 3)]
        assert_columns_equal(
            streams[(rank, "step_time")], {k: np.concatenate([e[k] for e in expected]) for k in expected[0]}
        )


DISK_FULL_SCRIPT = """
import resource, signal, sys
sys.path.insert(0, {tests!r})
from test_format_roundtrip import step_columns
from traceml.errors import WriterClosedError
from traceml.format import TmlWriter

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
w = TmlWriter(sys.argv[1], run_meta={{}}, segment_max_bytes=2_000, fsync_interval_s=None)
step = 0
try:
    while True:
        w.append(0, "step_time", step_columns(step, 10))
        step += 10
except WriterClosedError as exc:
    print("failed", w.rows_written, w.bytes_written, flush=True)
    print(exc, flush=True)
try:
    w.append(0, "step_time", step_columns(step, 10))
except WriterClosedError as exc:
    print("refused", flush=True)
    print(exc, flush=True)
w.close()
print("closed", flush=True)
"""


def test_disk_full_keeps_the_file_valid_up_to_the_last_segment(tmp_path: Path) -> None:
    path = tmp_path / "full.tml"
    script = DISK_FULL_SCRIPT.format(tests=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("failed") and lines[2] == "refused" and lines[-1] == "closed"
    _, rows_written, bytes_written = lines[0].split()
    assert "File too large" in lines[1] and "readable up to byte" in lines[1]
    assert lines[3] == lines[1]  # the same error again for every later call
    assert path.stat().st_size == int(bytes_written) < 20_000  # the partial record was cut off
    with open_recording(path) as r:
        steps = r.read_table("step_time")[0]["step"]
        integrity = r.integrity
    assert len(steps) == int(rows_written) > 0
    np.testing.assert_array_equal(steps, np.arange(len(steps)))
    assert integrity["status"] == "recovered" and integrity["skipped"] == []


def test_eio_on_write_closes_the_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import traceml.format.writer as writer_module

    path = tmp_path / "eio.tml"
    w = TmlWriter(path, run_meta={}, fsync_interval_s=None, clock=FakeClock())
    w.append(0, "step_time", step_columns(0, 5))
    w._close_segment()
    good = w.bytes_written
    real_write = os.write

    def failing_write(fd: int, data: Any) -> int:
        if fd == w._fd:
            real_write(fd, bytes(data)[:7])  # part of the record reaches the file first
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_write(fd, data)

    monkeypatch.setattr(writer_module.os, "write", failing_write)
    w.append(0, "step_time", step_columns(5, 5))
    with pytest.raises(WriterClosedError, match="Input/output error.*readable up to byte"):
        w._close_segment()
    with pytest.raises(WriterClosedError, match="Input/output error"):
        w.attach("x", {})
    with pytest.raises(WriterClosedError):
        w.tick()
    w.close()  # releases the file, raises nothing
    monkeypatch.undo()
    assert path.stat().st_size == good
    with open_recording(path) as r:
        np.testing.assert_array_equal(r.read_table("step_time")[0]["step"], np.arange(5))
        assert r.integrity["status"] == "recovered"


def test_writer_cannot_create_its_file(tmp_path: Path) -> None:
    from traceml.errors import FormatError

    with pytest.raises(FormatError, match="cannot create recording .*missing-dir"):
        TmlWriter(tmp_path / "missing-dir" / "x.tml", run_meta={})
    with pytest.raises(WriterClosedError, match="No space left on device"):
        TmlWriter("/dev/full", run_meta={})


def test_the_magic_and_the_header_reach_the_file_in_one_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer SIGKILLed while it opens its file leaves it empty or with a whole HEADER, never the
    magic alone (CI once caught an aggregator killed between two writes: an 8-byte file).  Every
    state the file passes through while the writer opens is read back."""
    import traceml.format.writer as writer_module

    path = tmp_path / "opening.tml"
    real_write = os.write
    sizes: list[int] = []

    def counting_write(fd: int, data: Any) -> int:
        if os.path.exists(path) and os.fstat(fd).st_ino == os.stat(path).st_ino:
            sizes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(writer_module.os, "write", counting_write)
    w = TmlWriter(path, run_meta={"run_id": "opening"}, fsync_interval_s=None, clock=FakeClock())
    monkeypatch.undo()
    assert len(sizes) == 1, (
        f"the file was opened in {len(sizes)} writes ({sizes}); a kill between them leaves a torn HEADER"
    )
    with open_recording(path) as r:  # the state right after that one write: a readable, empty recording
        assert r.header["run_id"] == "opening"
        assert r.read_table("step_time") == {}
    w.close()
