"""Reduce a long series for drawing: min/max per bucket (keeps spikes), both ends kept.

The browser never gets more than ``max_points`` points per trace; :class:`Trace` is one reduced line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: default cap on the points of one drawn trace (min/max gives 2 per bucket)
MAX_POINTS = 2000


def downsample_minmax(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Keep each bucket's minimum and maximum (in their original order) and both ends: <= ``max_points`` points.

    Buckets are equal runs of consecutive points; ``x`` is assumed sorted.  NaNs are
    ignored unless a whole bucket is NaN (then the bucket keeps a NaN, i.e. a gap).
    """
    x = np.asarray(x)
    y = np.asarray(y)
    n = len(y)
    if n <= max_points:
        return x, y
    max_points = max(max_points, 6)
    n_buckets = (max_points - 2) // 2  # two points per bucket, plus the first and the last point
    width = math.ceil(n / n_buckets)
    full = n // width
    yf = y.astype(np.float64, copy=False)
    body = yf[: full * width].reshape(full, width)
    if np.isnan(body).any():
        lo_src = np.where(np.isnan(body), np.inf, body)
        hi_src = np.where(np.isnan(body), -np.inf, body)
    else:
        lo_src = hi_src = body
    base = np.arange(full, dtype=np.int64) * width
    i_lo = base + lo_src.argmin(axis=1)
    i_hi = base + hi_src.argmax(axis=1)
    pairs = [np.minimum(i_lo, i_hi), np.maximum(i_lo, i_hi)]
    if full * width < n:
        tail = yf[full * width :]
        start = full * width
        finite = ~np.isnan(tail)
        if finite.any():
            t_lo = start + int(np.argmin(np.where(finite, tail, np.inf)))
            t_hi = start + int(np.argmax(np.where(finite, tail, -np.inf)))
        else:
            t_lo = t_hi = start
        pairs[0] = np.append(pairs[0], min(t_lo, t_hi))
        pairs[1] = np.append(pairs[1], max(t_lo, t_hi))
    idx = np.concatenate([[0], np.column_stack(pairs).ravel(), [n - 1]])  # keep the ends: the x range stays true
    keep = np.ones(len(idx), dtype=bool)
    keep[1:] = idx[1:] != idx[:-1]  # a bucket whose min and max are the same point
    idx = idx[keep]
    return x[idx], y[idx]


@dataclass(frozen=True)
class Trace:
    """One drawn line: ``x`` / ``y`` already reduced; ``points`` = rows it stands for."""

    name: str
    x: np.ndarray
    y: np.ndarray
    rank: int | None = None
    points: int = 0
    group: str = ""

    @property
    def downsampled(self) -> bool:
        return self.points > len(self.y)
