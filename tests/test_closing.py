"""close_run: the one end of a recorded run, shared by the aggregator and a rank's own file."""

from __future__ import annotations

from typing import Any

import grimp
import pytest

import traceml.diagnosis as diagnosis
from traceml.closing import close_run
from traceml.store import ColumnStore
from traceml.testing.synthetic import run_meta, synthetic_run

EXIT = {"exit_code": 0, "status": "ok", "duration_s": 1.0, "signal": ""}


class Recorder:
    """A writer that records what it is given (``fail_on`` makes that attachment raise)."""

    def __init__(self, fail_on: str = "") -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_on = fail_on

    def attach(self, name: str, data: Any) -> None:
        self.calls.append(("attach", name))
        if name == self.fail_on:
            raise OSError("disk full")

    def close(self, summary: Any = None) -> bool:
        self.calls.append(("close", summary))
        return True


def filled_store() -> ColumnStore:
    store = ColumnStore(capacity=None, meta={**run_meta(ranks=1), "status": "running"})
    for table, cols in synthetic_run(ranks=1, steps=60, seed=2)[0].items():
        store.append(0, table, cols)
    return store


def test_documents_go_to_store_and_file_then_the_summary_closes_the_file() -> None:
    store, writer = filled_store(), Recorder()
    summary, closed = close_run(store, writer, {"exit": EXIT, "ranks": {"ranks": []}}, on_summary_error=pytest.fail)
    assert closed is True and summary is not None and summary["steps"]["count"] > 0
    assert writer.calls == [("attach", "exit"), ("attach", "ranks"), ("close", summary)]
    view = store.snapshot()
    assert view.meta["status"] == "finished"
    assert list(view.attachments) == ["exit", "ranks", "summary"] and view.attachments["exit"] == EXIT


def test_a_failing_diagnosis_closes_the_file_without_a_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(view: Any) -> dict[str, Any]:
        raise ZeroDivisionError("a diagnosis bug")

    monkeypatch.setattr(diagnosis, "build_summary", broken)
    errors: list[BaseException | None] = []
    store, writer = filled_store(), Recorder()
    summary, _ = close_run(store, writer, {"exit": EXIT}, on_summary_error=lambda: errors.append(_current()))
    assert summary is None and writer.calls[-1] == ("close", None)
    assert len(errors) == 1 and isinstance(errors[0], ZeroDivisionError)  # called inside the except block
    assert "summary" not in store.snapshot().attachments


def _current() -> BaseException | None:
    import sys

    return sys.exc_info()[1]


def test_the_file_is_closed_even_when_an_attachment_fails() -> None:
    writer = Recorder(fail_on="exit")
    with pytest.raises(OSError, match="disk full"):
        close_run(filled_store(), writer, {"exit": EXIT, "ranks": {"ranks": []}}, on_summary_error=pytest.fail)
    assert writer.calls[0] == ("attach", "exit") and writer.calls[-1][0] == "close"


def test_without_a_writer_the_store_still_gets_the_end_state() -> None:
    store = filled_store()
    summary, closed = close_run(store, None, {"exit": EXIT}, on_summary_error=pytest.fail)
    assert closed is None and store.snapshot().attachments["summary"] == summary


def test_the_rank_side_sink_reaches_the_diagnosis_only_through_close_run() -> None:
    graph = grimp.build_graph("traceml", cache_dir=None)
    direct = graph.find_modules_directly_imported_by("traceml.runtime.sender")
    assert "traceml.closing" in direct
    assert not any(m.startswith("traceml.diagnosis") for m in direct)
    assert "traceml.closing" in graph.find_modules_directly_imported_by("traceml.aggregator.service")
