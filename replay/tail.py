"""Tail a recording still being written: one store kept level with the file (``--follow``, dashboard follow).

Once the file has its footer the store takes the file's end state and the view stops changing.
"""

from __future__ import annotations

from replay.engine import END_ATTACHMENTS, Recording
from traceml.schema import STANDARD_TABLES
from traceml.store import ColumnStore, RankInfo, StoreView
from traceml.store.view import META_RECORDING_BYTES, META_STATUS


class Tail:
    """A store over ``rec`` (opened with ``follow=True``) that grows with the file.  Not thread-safe:
    a reader is single-threaded, so callers from several threads hold their own lock."""

    def __init__(self, rec: Recording) -> None:
        self.rec = rec
        self.store: ColumnStore = rec.store()
        if not rec.finished:
            self.store.set_meta(**{META_STATUS: "running"})
        self._final: StoreView | None = None

    @property
    def finished(self) -> bool:
        """The writer closed the file (it has its footer)."""
        return self.rec.finished

    def poll(self) -> StoreView:
        """Append what the file gained since the last poll; the end state once it is finished."""
        if self._final is not None:
            return self._final
        rec, store = self.rec, self.store
        schemas = rec.schemas
        for rank, table, cols in rec.poll():
            store.append(rank, table, cols, schemas.get(table) or STANDARD_TABLES.get(table))
            if store.rank_info(rank) is None or store.rank_info(rank) == RankInfo(rank=rank):
                store.update_rank(rank, state="connected")
        if rec.finished:
            return self.finish()
        for name, data in rec.attachments.items():
            if name not in END_ATTACHMENTS:
                store.attach(name, data)
        meta = rec.meta
        store.set_meta(**{META_STATUS: meta[META_STATUS], META_RECORDING_BYTES: meta[META_RECORDING_BYTES]})
        store.set_integrity(rec.integrity)
        return store.snapshot()

    def finish(self) -> StoreView:
        """The rows so far under the file's end state (rank table, attachments, status, size,
        integrity): what a stopped tail shows; final (returned by every later call) once the file
        has its footer."""
        if self._final is not None:
            return self._final
        self.rec.fill_end_state(self.store)
        view = self.store.snapshot()
        if self.rec.finished:
            self._final = view
        return view
