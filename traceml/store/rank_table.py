"""Rank-side bounded table: tuple rows, bounded capacity, monotonic append counter.

The training thread only appends (cheaply); rows evicted before the sender took them are counted in ``lost``.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Any

from traceml.schema import TableSchema


class BoundedTable:
    __slots__ = ("schema", "capacity", "_rows", "_lock", "appended", "_taken", "lost", "_high_water", "on_high_water")

    def __init__(
        self, schema: TableSchema, capacity: int = 4096, on_high_water: Callable[[], None] | None = None
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.schema = schema
        self.capacity = capacity
        self._rows: deque[Sequence[Any]] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self.appended = 0  # monotonic: rows ever appended
        self._taken = 0  # value of `appended` at the last take
        self.lost = 0  # rows evicted before they were taken (cumulative)
        self._high_water = max(1, capacity // 2)
        #: called (from the appending thread, without the lock) when the unsent rows reach half the capacity
        self.on_high_water = on_high_water

    def append(self, row: Sequence[Any]) -> None:
        with self._lock:
            self._rows.append(row)
            self.appended += 1
            crossed = self.appended - self._taken == self._high_water
        if crossed and self.on_high_water is not None:
            try:
                self.on_high_water()
            except Exception:  # telemetry never breaks the training thread
                self.on_high_water = None

    def grow(self, capacity: int) -> bool:
        """Hold up to *capacity* rows from now on (never shrinks); True when it grew."""
        with self._lock:
            if capacity <= self.capacity:
                return False
            self._rows = deque(self._rows, maxlen=capacity)
            self.capacity = capacity
            self._high_water = max(1, capacity // 2)
            return True

    @property
    def unsent(self) -> int:
        return self.appended - self._taken

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
