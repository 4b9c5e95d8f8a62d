"""The spool thread: a real TmlWriter in tmp_path read back with open_recording; writer
failures (unwritable path, a write error mid-run) stop the recording once and never block."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from traceml.aggregator.spool import Spool
from traceml.format import TmlWriter, open_recording
from traceml.schema import PHASES, STANDARD_TABLES, STEP_TIME, rows_to_columns, table


def step_columns(first: int, n: int) -> dict[str, Any]:
    rows = [(s, 1_000 + s, 0, 10 * s, *([s] * len(PHASES))) for s in range(first, first + n)]
    return rows_to_columns(STEP_TIME, rows)


def real_writer(path: Path):
    return lambda: TmlWriter(path, run_meta={"run_id": "spool-test"}, schemas=list(STANDARD_TABLES.values()))


def test_spool_writes_every_batch_and_the_summary(tmp_path: Path) -> None:
    path = tmp_path / "run.tml"
    errors: list[str] = []
    sizes: list[int] = []
    spool = Spool(real_writer(path), str(path), on_error=errors.append, on_progress=sizes.append, tick_s=0.01)
    spool.start()
    custom = table("custom", ("ts_ns", "i8"), ("label", "str"))
    for rank in (0, 1):
        for first in range(0, 300, 100):
            spool.append(rank, "step_time", step_columns(first, 100))
    spool.append(1, "custom", {"ts_ns": np.array([5, 6], "<i8"), "label": ["a", "b"]}, custom)
    spool.attach("exit", {"exit_code": 0})
    assert spool.close(summary={"schema_version": 1, "note": "end"})
    assert errors == []
    rec = open_recording(path)
    assert rec.integrity["status"] == "complete"
    steps = rec.read_table("step_time")
    for rank in (0, 1):
        assert steps[rank]["step"].tolist() == list(range(300))
    assert list(rec.read_table("custom")[1]["label"]) == ["a", "b"]
    assert rec.attachments["exit"] == {"exit_code": 0}
    assert rec.attachments["summary"]["note"] == "end"
    assert spool.rows_written == 602 and spool.batches_written == 7
    assert sizes and sizes[-1] == path.stat().st_size == spool.bytes_on_disk


def test_unwritable_path_reports_once_and_discards(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    path = blocker / "run.tml"
    errors: list[str] = []
    spool = Spool(real_writer(path), str(path), on_error=errors.append, max_queued_bytes=1)
    spool.start()
    for first in range(50):
        spool.append(0, "step_time", step_columns(first, 1))  # a 1-byte queue: would block if not discarded
    assert spool.close()
    assert len(errors) == 1 and errors[0].startswith(f"cannot open {path}")
    assert not path.exists()


class FailingWriter:
    """Fails on the 3rd append, like a disk that filled up."""

    def __init__(self) -> None:
        self.appends = 0
        self.ticks = 0
        self.closed = threading.Event()

    def append(self, rank: int, table: str, columns: Any) -> None:
        self.appends += 1
        if self.appends == 3:
            raise OSError(28, "No space left on device")

    def attach(self, name: str, data: Any) -> None:
        pass

    def add_schema(self, schema: Any) -> None:
        pass

    def tick(self) -> None:
        self.ticks += 1

    def close(self, summary: Any = None) -> None:
        self.closed.set()


def test_write_error_mid_run_stops_recording_without_blocking(tmp_path: Path) -> None:
    writer = FailingWriter()
    errors: list[str] = []
    spool = Spool(lambda: writer, str(tmp_path / "x.tml"), on_error=errors.append, max_queued_bytes=1, tick_s=0.01)
    spool.start()
    for first in range(200):
        spool.append(0, "step_time", step_columns(first, 1))
    assert spool.close(summary={"ignored": True})
    assert len(errors) == 1 and "No space left on device" in errors[0]
    assert spool.error == errors[0]
    assert writer.appends == 3  # nothing written after the failure
    assert writer.closed.is_set()  # the file handle was released


def test_tick_runs_while_idle(tmp_path: Path) -> None:
    writer = FailingWriter()
    spool = Spool(lambda: writer, str(tmp_path / "x.tml"), on_error=lambda m: None, tick_s=0.005)
    spool.start()
    done = threading.Event()
    deadline = 500
    while writer.ticks < 3 and deadline:
        done.wait(0.01)
        deadline -= 1
    spool.close()
    assert writer.ticks >= 3
