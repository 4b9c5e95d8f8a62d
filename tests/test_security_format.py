"""Robust reading of crafted or damaged recordings: a byte-identical segment at another offset is
counted once and reported; a damaged HEADER costs only itself (format 1.2 keeps a copy of it in
every INDEX checkpoint), and ``recover`` salvages every intact segment after it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from traceml.errors import FormatError
from traceml.format import MAGIC, RecordKind, TmlWriter, _records, open_recording
from traceml.format.recover import recover
from traceml.schema import PHASES, STEP_TIME, Column, TableSchema, rows_to_columns

RUN_META = {"run_id": "robust-run", "hosts": ["node-a"], "command": ["train.py", "--lr", "3"], "world_size": 2}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _steps(lo: int, hi: int) -> dict[str, Any]:
    rows = [(s, 1_000 + s, 0, 500, *([50] * len(PHASES))) for s in range(lo, hi)]
    return rows_to_columns(STEP_TIME, rows)


def _write(path: Path, *, closed: bool = True, header_copies: bool = True) -> None:
    """300 steps of 2 ranks in 12 segments with index checkpoints every 4 segments."""
    clock = Clock()
    w = TmlWriter(path, run_meta=RUN_META, fsync_interval_s=None, checkpoint_every_segments=4, clock=clock)
    if not header_copies:  # a writer of format 1.1: its INDEX records hold no HEADER copy
        w._header = None  # type: ignore[assignment]
    w.attach("environment/rank0", {"python": "3.11"})
    for lo in range(0, 300, 50):
        for rank in (0, 1):
            w.append(rank, "step_time", _steps(lo, lo + 50))
            w._close_segment()
    if closed:
        w.close(summary={"steps": 300})
    else:
        w.tick()
        os.close(w._fd)  # killed: no footer


def _steps_of(r: Any) -> dict[int, list[int]]:
    return {rank: cols["step"].tolist() for rank, cols in r.read_table("step_time").items()}


# --- a byte-identical segment at another offset --------------------------------------------------


def _with_copy(path: Path, index_lists_it: bool) -> tuple[int, int]:
    """A well-formed file in which one segment's record appears twice; returns (original, copy) offsets."""
    clock = Clock()
    w = TmlWriter(path, run_meta=RUN_META, fsync_interval_s=None, checkpoint_every_segments=4, clock=clock)
    for lo in range(0, 300, 50):
        w.append(0, "step_time", _steps(lo, lo + 50))
        w._close_segment()
    original_offset, length, head = w._pending_segments[0]
    record = path.read_bytes()[original_offset : original_offset + length]
    copy_offset = w.bytes_written
    w._write(record)  # the same bytes again, at another offset
    if index_lists_it:
        w._pending_segments.append((copy_offset, length, head))
    w.close()
    return original_offset, copy_offset


@pytest.mark.parametrize("index_lists_it", [True, False])
def test_a_byte_identical_segment_at_another_offset_is_counted_once_and_reported(
    tmp_path: Path, index_lists_it: bool
) -> None:
    """Found by review: such a copy was read twice (334 or 390 rows for 300 steps) and inspect said
    "complete"."""
    path = tmp_path / "dup.tml"
    original, copy = _with_copy(path, index_lists_it)
    with open_recording(path) as r:
        assert _steps_of(r) == {0: list(range(300))}
        info = r.inspect()
        assert info["segments"]["rows"] == 300 and info["tables"]["step_time"]["rows"] == 300
        assert list(r.iter_batches()) and sum(len(c["step"]) for _, _, c in r.iter_batches()) == 300
        integrity = info["integrity"]
    assert integrity["status"] == "damaged"
    (dup,) = [s for s in integrity["skipped"] if s["offset"] == copy]
    assert f"byte-identical copy of the SEGMENT at byte {original}" in dup["reason"]
    from typer.testing import CliRunner

    from traceml.cli import app

    shown = CliRunner().invoke(app, ["inspect", str(path)])
    assert "byte-identical copy" in shown.output and "complete" not in shown.output.split("integrity:")[1][:40]
    result = recover(path, tmp_path / "clean.tml")
    assert result.rows == 300
    with open_recording(tmp_path / "clean.tml") as r:
        assert _steps_of(r) == {0: list(range(300))} and r.integrity["status"] == "complete"


def test_the_same_rows_appended_twice_by_the_writer_are_two_segments_both_read(tmp_path: Path) -> None:
    """Found by hypothesis: identical appends in two segments made byte-identical records that the
    copy check dropped (the file read "damaged").  Writers number their segments (``seq``)."""
    path = tmp_path / "twice.tml"
    w = TmlWriter(path, run_meta=RUN_META, fsync_interval_s=None, checkpoint_every_segments=2, clock=Clock())
    same = {"step": np.zeros(16, np.int64), "ts_ns": np.zeros(16, np.int64)}
    schema = TableSchema("t0", (Column("step", "i8"), Column("ts_ns", "i8")))
    w.add_schema(schema)
    for _ in range(2):
        w.append(0, "t0", same)
        w._close_segment()
    w.close()
    with open_recording(path) as r:
        assert r.integrity["status"] == "complete", r.integrity
        assert len(r.read_table("t0")[0]["step"]) == 32


def test_a_copy_after_a_crash_is_not_returned_twice_by_follow_mode(tmp_path: Path) -> None:
    path = tmp_path / "live.tml"
    _write(path, closed=False)
    with open_recording(path) as r:
        first = r.segments[0]
    data = path.read_bytes()
    with open_recording(path, follow=True) as r:
        before = sum(len(c["step"]) for _, _, c in r.iter_batches())
        with open(path, "ab") as f:
            f.write(data[first.offset : first.offset + first.length])
        assert r.poll() == []
        assert any("byte-identical copy" in s["reason"] for s in r.integrity["skipped"])
        assert sum(len(c["step"]) for _, _, c in r.iter_batches()) == before == 600


def test_segments_with_the_same_head_but_other_bytes_are_both_read(tmp_path: Path) -> None:
    """The dedup compares bytes, not heads: two segments whose heads agree but whose values differ are kept."""
    path = tmp_path / "twins.tml"
    clock = Clock()
    with TmlWriter(path, run_meta=RUN_META, fsync_interval_s=None, clock=clock) as w:
        for value in (5, 6):
            cols = _steps(0, 50)
            cols["forward_us"] = np.full(50, value)
            w.append(0, "step_time", cols)
            w._close_segment()
    with open_recording(path) as r:
        heads = [(s.length, s.raw_size, s.step_min, s.step_max, s.t_min, s.t_max) for s in r.segments]
        forward = r.read_table("step_time")[0]["forward_us"].tolist()
        r.verify()
        assert r.integrity["status"] == "complete"
    assert heads[0] == heads[1]  # the case the comparison of bytes is for
    assert forward == [5] * 50 + [6] * 50


# --- a damaged HEADER --------------------------------------------------------------------------


def _header_end(path: Path) -> int:
    data = path.read_bytes()
    (length,) = np.frombuffer(data[len(MAGIC) + 17 : len(MAGIC) + 21], "<u4")
    return len(MAGIC) + _records.FRAME_OVERHEAD + int(length)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None)
@given(data=st.data(), closed=st.booleans())
def test_every_intact_segment_after_a_damaged_header_is_read_and_recovered(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, closed: bool
) -> None:
    """Found by fuzzing: with only the HEADER damaged, ``recover`` exited 1 and saved nothing
    (85 of 620 files).  Now the reader resynchronises past it and takes the header from the copy
    in the last INDEX checkpoint."""
    tmp = tmp_path_factory.mktemp("hdr")
    path = tmp / "run.tml"
    _write(path, closed=closed)
    end = _header_end(path)
    damaged = bytearray(path.read_bytes())
    how = data.draw(st.sampled_from(["flip", "bytes", "zero", "sync"]))
    if how == "flip":
        for at in data.draw(st.lists(st.integers(len(MAGIC), end - 1), min_size=1, max_size=8)):
            damaged[at] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "bytes":
        at = data.draw(st.integers(len(MAGIC), end - 1))
        junk = data.draw(st.binary(min_size=1, max_size=end - at))
        damaged[at : at + len(junk)] = junk
    elif how == "zero":
        damaged[len(MAGIC) : end] = bytes(end - len(MAGIC))
    else:  # the frame's sync marker itself
        damaged[len(MAGIC) : len(MAGIC) + 16] = os.urandom(16)
    if damaged == path.read_bytes():
        return
    path.write_bytes(damaged)
    with open_recording(path) as r:
        assert _steps_of(r) == {0: list(range(300)), 1: list(range(300))}
        assert r.header_restored is not None and "INDEX record at byte" in r.header_restored
        assert r.header["run_id"] == "robust-run" and r.header["command"] == RUN_META["command"]
        assert r.attachments["environment/rank0"] == {"python": "3.11"}
        integrity = r.integrity
    assert integrity["status"] == "damaged"
    assert (
        integrity["skipped"][0]["offset"] == len(MAGIC) and "HEADER record damaged" in integrity["skipped"][0]["reason"]
    )
    result = recover(path, tmp / "clean.tml")
    assert result.rows == 600
    assert any(line.startswith("HEADER damaged: restored from the copy") for line in result.unrestored)
    with open_recording(tmp / "clean.tml") as r:
        assert r.integrity["status"] == "complete" and r.header["run_id"] == "robust-run"
        assert _steps_of(r) == {0: list(range(300)), 1: list(range(300))}
        assert r.header["hosts"] == ["node-a"] and r.header["world_size"] == 2


def test_an_old_file_without_header_copies_still_gives_its_rows_and_says_what_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "old.tml"
    _write(path, header_copies=False)
    damaged = bytearray(path.read_bytes())
    damaged[len(MAGIC) + 40] ^= 0xFF  # inside the HEADER payload
    path.write_bytes(damaged)
    with open_recording(path) as r:
        assert _steps_of(r) == {0: list(range(300)), 1: list(range(300))}
        assert r.header_restored is not None and "lost" in r.header_restored
        assert r.header["run_id"] == "" and r.integrity["status"] == "damaged"
        assert r.read_rollup("step_time")[0]["rows"].sum() == 300  # stored rollups still read
    result = recover(path, tmp_path / "clean.tml")
    assert result.rows == 600
    (line,) = [u for u in result.unrestored if u.startswith("HEADER damaged")]
    assert "run id, hosts, command, world size and metadata are lost" in line
    with open_recording(tmp_path / "clean.tml") as r:
        assert r.integrity["status"] == "complete" and _steps_of(r)[1] == list(range(300))


def test_a_file_with_no_intact_record_still_fails_with_the_header_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.tml"
    path.write_bytes(MAGIC + os.urandom(300))
    with pytest.raises(FormatError, match="HEADER"):
        open_recording(path)
    with pytest.raises(FormatError):
        recover(path, tmp_path / "out.tml")
    assert not (tmp_path / "out.tml").exists()


def test_every_index_checkpoint_holds_the_header(tmp_path: Path) -> None:
    path = tmp_path / "run.tml"
    _write(path)
    data = path.read_bytes()
    header = data[len(MAGIC) + 25 : _header_end(path) - 4]
    with open_recording(path) as r:
        sync = r.header["sync"]
    indexes = 0
    pos = data.find(sync)
    while pos >= 0:
        kind, length = _records.parse_frame_head(data[pos : pos + 25], sync)
        if kind == RecordKind.INDEX:
            indexes += 1
            assert _records.parse_index(data[pos + 25 : pos + 25 + length]).header == header
        pos = data.find(sync, pos + 29 + length)
    assert indexes >= 3


def test_traceml_recover_on_a_damaged_header_writes_every_row_and_exits_3(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from traceml.cli import app

    path = tmp_path / "run.tml"
    _write(path)
    damaged = bytearray(path.read_bytes())
    damaged[len(MAGIC) : len(MAGIC) + 30] = bytes(30)  # sync marker, kind, length and CRC of the HEADER
    path.write_bytes(damaged)
    result = CliRunner().invoke(app, ["recover", str(path), "-o", str(tmp_path / "clean.tml")])
    assert result.exit_code == 3, result.output  # data lost: the HEADER record itself
    assert "600 rows" in result.output and "HEADER record damaged" in result.output
    assert "restored from the copy in the INDEX record" in result.output
    with open_recording(tmp_path / "clean.tml") as r:
        assert _steps_of(r) == {0: list(range(300)), 1: list(range(300))} and r.header["run_id"] == "robust-run"
