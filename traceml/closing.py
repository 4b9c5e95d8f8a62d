"""The end of a recorded run, written once for both writers of a ``.tml``: the aggregator and a rank's FileSink.

:func:`close_run` writes the closing documents, the summary and the close; fail-open: a diagnosis bug
never costs the recording its close.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from traceml.store import ColumnStore, StoreView
from traceml.store.view import META_STATUS


class RunWriter(Protocol):
    """What closing needs of a recording writer (``TmlWriter``, the aggregator's ``Spool``)."""

    def attach(self, name: str, data: Any) -> Any: ...
    def close(self, summary: Any = None) -> Any: ...


def close_run(
    store: ColumnStore,
    writer: RunWriter | None,
    documents: Mapping[str, Mapping[str, Any]],
    *,
    on_summary_error: Callable[[], None],
) -> tuple[dict[str, Any] | None, Any]:
    """Close a run: *documents* into *store* and then *writer*, the status ``finished``, the
    summary built from *store* and attached as ``summary``, *writer* closed with it (also when an
    attachment failed).  ``on_summary_error`` runs inside the ``except`` block when the summary
    cannot be built; the run then closes without one.  Returns ``(summary, writer.close(...))``."""
    for name, doc in documents.items():
        store.attach(name, dict(doc))
    store.set_meta(**{META_STATUS: "finished"})
    summary = run_summary(store.snapshot(), on_summary_error)
    if summary is not None:
        store.attach("summary", summary)
    if writer is None:
        return summary, None
    try:
        for name, doc in documents.items():
            writer.attach(name, dict(doc))
    finally:
        closed = writer.close(summary=summary)
    return summary, closed


def run_summary(view: StoreView, on_error: Callable[[], None]) -> dict[str, Any] | None:
    """The run summary of *view*, or ``None`` (after ``on_error()`` inside the ``except`` block)
    when the diagnosis fails: fail-open, for the close and for a live export alike."""
    try:  # imported here: a rank that records its own file loads the diagnosis only at its end
        from traceml.diagnosis import build_summary
    except ImportError:
        return None
    try:
        return build_summary(view)
    except Exception:
        on_error()
        return None
