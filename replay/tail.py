"""Tail a recording still being written (``--follow``, dashboard follow) in bounded memory, however long it grows.

Within the row budget the tail holds every row; beyond it, the bounded reader's sample and exact totals
(:class:`replay.bounded.BoundedBuilder`).  At the footer: the view ``replay`` shows of the same file.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from replay.bounded import BoundedBuilder, bounded_view, data_rows, row_budget
from replay.engine import END_ATTACHMENTS, Recording
from traceml.schema import STANDARD_TABLES, is_rollup
from traceml.store import ColumnStore, RankInfo, StoreView
from traceml.store.view import META_RECORDING_BYTES, META_STATUS


class Tail:
    """A view over ``rec`` (opened with ``follow=True``) that grows with the file (``budget``: rows, default
    ``TRACEML_ROW_BUDGET``).  Not thread-safe:
    a reader is single-threaded, so callers from several threads hold their own lock.

    Memory: while the file's rows fit the budget they are all held, as
    ``replay`` holds them; past it the rows are dropped and the tail keeps what a bounded read keeps
    (a stride sample, each rank's last steps whole, exact counts and sums, 1% sketches), the stride
    doubling as the file grows so the sample stays within the budget.  Building that view costs
    about 0.3 s per million rows held, so past the budget a poll rebuilds it only once the time
    since the last build is ``REBUILD_FACTOR`` times what that build took (at most ~10% of a core);
    the polls between read and fold the new rows and show the previous view.
    """

    #: past the budget, a view is rebuilt after this many times its own build time
    REBUILD_FACTOR = 10.0

    def __init__(
        self, rec: Recording, *, budget: int | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rec = rec
        self._clock = clock
        self._built_at = 0.0
        self._build_s = 0.0
        self.budget = row_budget(budget)
        self._builder: BoundedBuilder | None = None
        #: ranks that appeared while tailing: shown connected until the file says otherwise
        self._connected: set[int] = set()
        self._final: StoreView | None = None
        self._at_open = set(rec.ranks)
        if data_rows(rec) > self.budget and rec.finished:  # nothing to follow: the end view at once
            self.store = ColumnStore(capacity=0, meta=rec.meta)
            self._view = self._final = bounded_view(rec, self.budget)
            return
        if data_rows(rec) > self.budget:
            self.store = ColumnStore(capacity=0, meta=rec.meta)
            self._go_bounded()
        else:
            self.store = rec.store()
        if not rec.finished:
            self.store.set_meta(**{META_STATUS: "running"})
        self._view = self._current()

    @property
    def finished(self) -> bool:
        """The writer closed the file (it has its footer)."""
        return self.rec.finished

    @property
    def bounded(self) -> bool:
        """The file outgrew the row budget: the tail holds a sample and totals, not every row."""
        return self._builder is not None

    def held(self) -> int:
        """Data rows held now (what memory grows with): at most about the row budget."""
        if self._builder is not None:
            return self._builder.held()
        return self.store.snapshot().total_rows()

    def latest(self) -> StoreView:
        """The view of the last poll (no reading): what a driver redraws between polls."""
        return self._view

    def poll(self) -> StoreView:
        """Add what the file gained since the last poll; the end state once it is finished."""
        if self._final is not None:
            return self._final
        rec, store = self.rec, self.store
        batches = [b for b in rec.poll() if b[2] and not is_rollup(b[1])]
        self._connected.update(rank for rank, _, _ in batches if rank not in self._at_open)
        if self._builder is None and batches and data_rows(rec) > self.budget:
            self._go_bounded()  # reads every segment so far: these batches included
        elif self._builder is not None:
            for rank, table, cols in batches:
                self._builder.add(rank, table, cols)
            self._builder.fit()
        else:
            schemas = rec.schemas
            for rank, table, cols in batches:
                store.append(rank, table, cols, schemas.get(table) or STANDARD_TABLES.get(table))
        if rec.finished:
            return self.finish()
        if self._builder is None or self._clock() - self._built_at > self.REBUILD_FACTOR * self._build_s:
            self._view = self._current()
        return self._view

    def _go_bounded(self) -> None:
        """Past the budget: drop the rows; one pass over the file so far into the bounded reader's
        builder, which the later polls feed."""
        rec = self.rec
        self.store = ColumnStore(capacity=0, meta=rec.meta)
        builder = BoundedBuilder(rec, self.budget)
        for seg in rec.segments:
            if all(is_rollup(t) for (_, t) in seg.rows):
                continue
            for rank, table, cols in rec.read_segment(seg):
                builder.add(rank, table, cols)
        builder.fit()
        self._builder = builder

    def _current(self, *, end: bool = False) -> StoreView:
        """The view of the rows so far: live status, the attachments written so far (the end ones
        too when ``end``), the ranks seen connecting."""
        rec = self.rec
        if self._builder is not None:
            began = self._clock()
            view = self._builder.view(final=False)
            self._built_at = self._clock()
            self._build_s = self._built_at - began
            infos = dict(view.rank_info)
            for rank in self._connected:
                info = infos.get(rank)
                if info is None or info.state == "unknown":
                    infos[rank] = dataclasses.replace(info or RankInfo(rank=rank), state="connected")
            attachments = {k: v for k, v in view.attachments.items() if end or k not in END_ATTACHMENTS}
            meta = dict(view.meta)
            if not rec.finished:
                meta[META_STATUS] = "running"
            return dataclasses.replace(view, rank_info=infos, attachments=attachments, meta=meta)
        store = self.store
        for rank in self._connected:
            if store.rank_info(rank) in (None, RankInfo(rank=rank)):
                store.update_rank(rank, state="connected")
        if end:
            rec.fill_end_state(store)
            return store.snapshot()
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
        has its footer: then a tail past the budget is the bounded view ``replay`` shows of the file."""
        if self._final is not None:
            return self._final
        if self.rec.finished and self._builder is not None:
            # the sample's stride was doubled as the file grew; the file's own plan draws the one
            # ``replay`` shows (one more pass, in bounded memory), so the two end states are equal
            self._builder = None
            self._view = self._final = bounded_view(self.rec, self.budget)
            return self._final
        view = self._current(end=True)
        if self.rec.finished:
            self._final = view
        self._view = view
        return view
