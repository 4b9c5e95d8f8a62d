"""replay.tail.Tail: the one tail behind ``replay --follow`` and the dashboard's follow source."""

from __future__ import annotations

from pathlib import Path

import replay
from replay.tail import Tail
from traceml.format import TmlWriter
from traceml.testing.synthetic import run_meta, synthetic_run


def test_a_tail_grows_with_the_file_and_freezes_on_its_end_state(tmp_path: Path) -> None:
    path = tmp_path / "growing.tml"
    run = synthetic_run(ranks=2, steps=200, seed=5)
    with TmlWriter(path, run_meta=run_meta(ranks=2), segment_max_bytes=1024, fsync_interval_s=None) as writer:
        writer.append(0, "step_time", {k: v[:50] for k, v in run[0]["step_time"].items()})
        writer.tick()
        with replay.open(path, follow=True, progress=False) as rec:
            tail = Tail(rec)
            first = tail.poll()
            assert not tail.finished and first.meta["status"] == "running"
            writer.append(0, "step_time", {k: v[50:] for k, v in run[0]["step_time"].items()})
            writer.append(1, "step_time", run[1]["step_time"])
            writer.tick()
            grown = tail.poll()
            assert grown.total_rows() > first.total_rows() and grown.rows("step_time", 1) > 0
            assert grown.rank_info[1].state == "connected"  # a rank that appears while tailing
            stopped = tail.finish()  # a tail stopped before the footer: the rows, not frozen
            assert stopped.meta["status"] == "running" and tail.poll() is not stopped
            writer.attach("exit", {"exit_code": 0, "status": "ok", "duration_s": 1.0, "signal": ""})
            writer.close()
            end = tail.poll()
            assert tail.finished and end.meta["status"] == "finished" and "exit" in end.attachments
            assert end.integrity["status"] == "complete" and end.total_rows() == 400
            # no ranks document in this file: its unknown state does not replace a rank seen connecting
            assert end.rank_info[1].state == "connected" and end.rank_info[0].state == "unknown"
            assert tail.poll() is end and tail.finish() is end
