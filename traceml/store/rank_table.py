"""Rank-side bounded table: tuple rows, fixed capacity, monotonic append counter.

The training thread only appends (a lock, a deque append, a counter).  The sender
thread takes the rows appended since its last take; rows evicted before they were
taken are counted in ``lost``, so nothing vanishes silently.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from itertools import islice
from typing import Any

from traceml.schema import TableSchema


class BoundedTable:
    __slots__ = ("schema", "capacity", "_rows", "_lock", "appended", "_taken", "lost")

    def __init__(self, schema: TableSchema, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.schema = schema
        self.capacity = capacity
        self._rows: deque[Sequence[Any]] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self.appended = 0  # monotonic: rows ever appended
        self._taken = 0  # value of `appended` at the last take
        self.lost = 0  # rows evicted before they were taken (cumulative)

    def append(self, row: Sequence[Any]) -> None:
        with self._lock:
            self._rows.append(row)
            self.appended += 1

    def take_unsent(self) -> list[Sequence[Any]]:
        """Rows appended since the previous call (oldest first); counts evicted ones in ``lost``."""
        with self._lock:
            new = self.appended - self._taken
            if new == 0:
                return []
            have = min(new, len(self._rows))
            self.lost += new - have
            self._taken = self.appended
            return list(islice(self._rows, len(self._rows) - have, None))

    def recent(self, n: int | None = None) -> list[Sequence[Any]]:
        """The last ``n`` rows still held (all when ``n`` is None), for local inspection."""
        with self._lock:
            rows = list(self._rows)
        return rows if n is None else rows[-n:]

    def __len__(self) -> int:
        return len(self._rows)
