"""Aggregator-side live store: per (rank, table) bounded column chunks.

Thread-safe appends; :meth:`ColumnStore.snapshot` gives a :class:`StoreView`.  Oldest rows are evicted first
and counted in ``evicted`` (replay uses ``capacity=None``: unbounded).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from traceml.errors import StoreError
from traceml.schema import NUMPY_DTYPES, STANDARD_TABLES, TableSchema, column_length, schema_from_columns
from traceml.store.view import RankInfo, StoreView


def _as_array(values: Any, dtype: np.dtype[Any] | None) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    return np.asarray(values, dtype=object if dtype is None else dtype)


#: a batch kept as it arrived costs a dict and an array (over its own payload bytes) per column:
#: ~1.5 KB, against ~50-70 B of data per row.  Batches under this many rows (the one-row batches
#: of the 1 Hz samples, or of ``step_time`` when steps are slower than the rank's 0.5 s flush) are
#: merged, so that a row costs about its data; bigger ones are kept as they come (no copy).
SMALL_BATCH_ROWS = 256
#: small batches are merged into chunks of about this many rows ...
COALESCE_ROWS = 4096
#: ... or as soon as this many wait unmerged.  A snapshot still compacts the whole series.
COALESCE_BATCHES = 32


def _chunk_rows(chunk: dict[str, np.ndarray]) -> int:
    return len(next(iter(chunk.values()))) if chunk else 0


class _Series:
    """Chunked columns of one (rank, table)."""

    __slots__ = ("chunks", "rows", "evicted", "_cache", "_tail", "_tail_rows")

    def __init__(self) -> None:
        self.chunks: list[dict[str, np.ndarray]] = []
        self.rows = 0
        self.evicted = 0
        self._cache: dict[str, np.ndarray] | None = None
        #: the last ``_tail`` chunks are batches not merged yet, ``_tail_rows`` rows in all
        self._tail = 0
        self._tail_rows = 0

    def append(self, cols: dict[str, np.ndarray], n: int, capacity: int | None) -> None:
        if n >= SMALL_BATCH_ROWS:
            if self._tail > 1:
                self._coalesce()  # the small batches before it
            self._tail = self._tail_rows = 0
            self.chunks.append(cols)
        else:
            self.chunks.append(cols)
            self._tail += 1
            self._tail_rows += n
            if self._tail >= COALESCE_BATCHES or (self._tail > 1 and self._tail_rows >= COALESCE_ROWS):
                self._coalesce()
        self.rows += n
        self._cache = None
        if capacity is not None and self.rows > capacity:
            self._evict(self.rows - capacity)

    def _coalesce(self) -> None:
        """Merge the unmerged small batches (and the chunk before them while it is small) into one."""
        k = min(self._tail, len(self.chunks))
        if len(self.chunks) > k and _chunk_rows(self.chunks[-k - 1]) < COALESCE_ROWS:
            k += 1
        self._tail = self._tail_rows = 0
        group = self.chunks[-k:]
        names = group[-1].keys()
        if k < 2 or any(ch.keys() != names for ch in group):
            return  # a batch without some column stays as it came (columns() copes with it)
        self.chunks[-k:] = [{c: np.concatenate([ch[c] for ch in group]) for c in names}]

    def _evict(self, k: int) -> None:
        self.evicted += k
        self.rows -= k
        while k > 0:
            first = self.chunks[0]
            n0 = _chunk_rows(first)
            if n0 <= k:
                self.chunks.pop(0)
                k -= n0
            else:
                self.chunks[0] = {c: a[k:] for c, a in first.items()}
                k = 0
        self._tail = min(self._tail, len(self.chunks))

    def columns(self) -> dict[str, np.ndarray]:
        if self._cache is None:
            if not self.chunks:
                self._cache = {}
            elif len(self.chunks) == 1:
                self._cache = self.chunks[0]
            else:
                names = self.chunks[-1].keys()
                self._cache = {c: np.concatenate([ch[c] for ch in self.chunks if c in ch]) for c in names}
                self.chunks = [self._cache]  # compact: later snapshots reuse it
            self._tail = self._tail_rows = 0
            for a in self._cache.values():
                a.flags.writeable = False
        return self._cache


class ColumnStore:
    """Bounded, column-wise store of every rank's tables.  Thread-safe."""

    def __init__(self, capacity: int | None = 200_000, meta: Mapping[str, Any] | None = None) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._series: dict[tuple[str, int], _Series] = {}
        self._schemas: dict[str, TableSchema] = dict(STANDARD_TABLES)
        self._ranks: dict[int, RankInfo] = {}
        self._attachments: dict[str, Any] = {}
        self._meta: dict[str, Any] = dict(meta or {})
        self._integrity: dict[str, Any] | None = None
        self._latest_ns = 0

    # -- writers ---------------------------------------------------------------
    def append(self, rank: int, table: str, columns: Mapping[str, Any], schema: TableSchema | None = None) -> int:
        """Append a batch of columns; returns the row count.  Raises StoreError on ragged columns."""
        try:
            n = column_length(columns)
        except Exception as exc:
            raise StoreError(f"batch for rank {rank} table {table!r}: {exc}") from exc
        if n == 0:
            return 0
        with self._lock:
            known = self._schemas.get(table)
            if known is None:
                known = schema or schema_from_columns(table, columns)
                self._schemas[table] = known
            cols = {}
            for col in known.columns:
                if col.name in columns:
                    cols[col.name] = _as_array(columns[col.name], NUMPY_DTYPES.get(col.dtype))
            series = self._series.get((table, rank))
            if series is None:
                series = self._series[(table, rank)] = _Series()
            series.append(cols, n, self.capacity)
            ts = cols.get("ts_ns")
            if ts is not None and len(ts) and ts.dtype.kind == "i":
                self._latest_ns = max(self._latest_ns, int(ts[-1]))
            if rank not in self._ranks:
                self._ranks[rank] = RankInfo(rank=rank)
        return n

    def set_rank(self, info: RankInfo) -> None:
        with self._lock:
            self._ranks[info.rank] = info

    def update_rank(self, rank: int, **changes: Any) -> RankInfo:
        with self._lock:
            cur = self._ranks.get(rank, RankInfo(rank=rank))
            new = replace(cur, **changes)
            self._ranks[rank] = new
            return new

    def rank_info(self, rank: int) -> RankInfo | None:
        with self._lock:
            return self._ranks.get(rank)

    def attach(self, name: str, data: Any) -> None:
        with self._lock:
            self._attachments[name] = data

    def set_meta(self, **meta: Any) -> None:
        with self._lock:
            self._meta.update(meta)

    def set_integrity(self, integrity: Mapping[str, Any] | None) -> None:
        with self._lock:
            self._integrity = dict(integrity) if integrity is not None else None

    def add_schema(self, schema: TableSchema) -> None:
        with self._lock:
            self._schemas.setdefault(schema.name, schema)

    # -- reader ----------------------------------------------------------------
    def snapshot(self) -> StoreView:
        """A consistent read-only view of everything held now."""
        with self._lock:
            tables = {key: s.columns() for key, s in self._series.items()}
            evicted = {key: s.evicted for key, s in self._series.items() if s.evicted}
            return StoreView(
                meta=dict(self._meta),
                schemas=dict(self._schemas),
                tables=tables,
                rank_info=dict(self._ranks),
                attachments=dict(self._attachments),
                evicted=evicted,
                latest_ns=self._latest_ns,
                integrity=dict(self._integrity) if self._integrity is not None else None,
            )
