"""Choosing rows from a StoreView: the selected ranks of a table, the run's time zero, columns
sorted by a key and the slice of a sorted key within a range.  Pure numpy."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from traceml.store import StoreView

StepRange = tuple[int, int]
TimeRange = tuple[float, float]


def selected_ranks(view: StoreView, table: str, ranks: Iterable[int] | None) -> list[int]:
    """The ranks holding ``table``, restricted to ``ranks`` when given (in the view's order)."""
    present = view.table_ranks(table)
    if ranks is None:
        return present
    wanted = set(ranks)
    return [r for r in present if r in wanted]


def origin_ns(view: StoreView) -> int:
    """The run's time zero: ``meta['start_ns']`` when set, else the earliest timestamp held."""
    start = view.meta.get("start_ns")
    if isinstance(start, int) and start > 0:
        return start
    first = [int(c["ts_ns"][0]) for c in view.tables.values() if "ts_ns" in c and len(c["ts_ns"])]
    return min(first) if first else 0


def sorted_by(cols: Mapping[str, np.ndarray], key: str) -> Mapping[str, np.ndarray]:
    """``cols`` with every column in the (stable) order of ``cols[key]``; unchanged when already sorted."""
    k = cols[key]
    if len(k) < 2 or bool(np.all(k[1:] >= k[:-1])):
        return cols
    order = np.argsort(k, kind="stable")
    return {c: np.asarray(v)[order] for c, v in cols.items()}


def range_slice(keys: np.ndarray, lo: float | None, hi: float | None) -> slice:
    """The slice of sorted ``keys`` within ``[lo, hi]`` (an open end when None)."""
    a = 0 if lo is None else int(np.searchsorted(keys, lo, side="left"))
    b = len(keys) if hi is None else int(np.searchsorted(keys, hi, side="right"))
    return slice(a, b)


def ms(values: np.ndarray) -> np.ndarray:
    """``*_us`` int64 (``-1`` = not measured) -> float ms with NaN for missing."""
    out = values.astype(np.float64) / 1000.0
    if len(values) and values.min() < 0:
        out[values < 0] = np.nan
    return out
