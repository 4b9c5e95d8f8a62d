"""Row-range helpers of the reader: which segments a step/time range can skip, and the
rows of a batch inside it.  Pure functions on numpy columns; no I/O."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

#: inclusive (low, high); None on either side leaves that side open
Range = tuple[int | None, int | None]


def _inside(lo: int | None, hi: int | None, rng: Range) -> bool:
    """Whether [lo, hi] lies inside the range (unknown bounds: no)."""
    if lo is None or hi is None:
        return False
    low, high = rng
    return (low is None or lo >= low) and (high is None or hi <= high)


def _disjoint(lo: int | None, hi: int | None, rng: Range | None) -> bool:
    if rng is None or lo is None or hi is None:
        return False
    low, high = rng
    return (high is not None and lo > high) or (low is not None and hi < low)


def _trim(
    cols: dict[str, np.ndarray], step_range: Range | None, time_range: Range | None
) -> dict[str, np.ndarray] | None:
    """Rows inside both ranges (a range whose column is absent does not filter); None if none."""
    mask = None
    for column, rng in (("step", step_range), ("ts_ns", time_range)):
        if rng is None or column not in cols:
            continue
        values = cols[column]
        low, high = rng
        keep = np.ones(len(values), dtype=bool)
        if low is not None:
            keep &= values >= low
        if high is not None:
            keep &= values <= high
        mask = keep if mask is None else mask & keep
    if mask is None:
        return cols if _rows(cols) else None
    if mask.all():
        return cols if len(mask) else None
    if not mask.any():
        return None
    return {name: values[mask] for name, values in cols.items()}


def _rows(cols: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(cols.values()))) if cols else 0


def _concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(chunks) == 1:
        return chunks[0]
    return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
