"""A mergeable quantile sketch with relative accuracy: the streaming statistics of long recordings.

Any quantile lies within relative error ``a`` (1% by default); count, sum, min and max are exact; memory is
a few thousand integers whatever the number of values.  Pure numpy; no clock, no I/O.
"""

from __future__ import annotations

import math

import numpy as np

#: default relative accuracy of the quantiles
RELATIVE_ACCURACY = 0.01
#: magnitudes below this count as zero (they have no useful logarithm)
MIN_MAGNITUDE = 1e-9


class QuantileSketch:
    """Counts of finite values in logarithmic buckets; quantiles within ``accuracy`` relative error.

    ``nan`` and infinite values are ignored (not measured); negative values are kept in a mirrored
    store, so the sketch takes any finite value.
    """

    __slots__ = (
        "accuracy",
        "_gamma_log",
        "_pos",
        "_pos_off",
        "_neg",
        "_neg_off",
        "zeros",
        "count",
        "sum",
        "min",
        "max",
    )

    def __init__(self, accuracy: float = RELATIVE_ACCURACY) -> None:
        if not 0.0 < accuracy < 1.0:
            raise ValueError(f"relative accuracy {accuracy!r}: expected a number between 0 and 1 (e.g. 0.01)")
        self.accuracy = accuracy
        self._gamma_log = math.log((1.0 + accuracy) / (1.0 - accuracy))
        self._pos = np.zeros(0, np.int64)
        self._pos_off = 0
        self._neg = np.zeros(0, np.int64)
        self._neg_off = 0
        self.zeros = 0
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    # -- adding ----------------------------------------------------------------------------
    def add(self, values: np.ndarray | list[float] | float) -> None:
        """Add every finite value of ``values`` (an array, a list or one number)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        if not len(v):
            return
        self.count += len(v)
        self.sum += float(v.sum())
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))
        mag = np.abs(v)
        small = mag < MIN_MAGNITUDE
        self.zeros += int(small.sum())
        pos = v[(v > 0) & ~small]
        neg = -v[(v < 0) & ~small]
        if len(pos):
            self._pos, self._pos_off = self._add_counts(self._pos, self._pos_off, self._index(pos))
        if len(neg):
            self._neg, self._neg_off = self._add_counts(self._neg, self._neg_off, self._index(neg))

    def _index(self, mag: np.ndarray) -> np.ndarray:
        return np.ceil(np.log(mag) / self._gamma_log).astype(np.int64)

    @staticmethod
    def _add_counts(store: np.ndarray, off: int, idx: np.ndarray) -> tuple[np.ndarray, int]:
        lo = int(idx.min())
        counts = np.bincount(idx - lo)
        return QuantileSketch._merge_counts(store, off, counts, lo)

    @staticmethod
    def _merge_counts(store: np.ndarray, off: int, counts: np.ndarray, lo: int) -> tuple[np.ndarray, int]:
        if not len(counts):
            return store, off
        if not len(store):
            return counts.astype(np.int64, copy=True), lo
        new_off = min(off, lo)
        new_end = max(off + len(store), lo + len(counts))
        if new_off == off and new_end == off + len(store):
            out = store
        else:
            out = np.zeros(new_end - new_off, np.int64)
            out[off - new_off : off - new_off + len(store)] = store
        out[lo - new_off : lo - new_off + len(counts)] += counts
        return out, new_off

    def merge(self, other: QuantileSketch) -> None:
        """Add ``other``'s values to this sketch (both must have the same accuracy)."""
        if other.accuracy != self.accuracy:
            raise ValueError(f"cannot merge sketches of accuracy {other.accuracy} into {self.accuracy}")
        self._pos, self._pos_off = self._merge_counts(self._pos, self._pos_off, other._pos, other._pos_off)
        self._neg, self._neg_off = self._merge_counts(self._neg, self._neg_off, other._neg, other._neg_off)
        self.zeros += other.zeros
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    # -- reading ----------------------------------------------------------------------------
    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else math.nan

    def quantile(self, q: float) -> float:
        """The value of rank ``floor(q * (count - 1))`` (0-based, ascending) within the relative
        accuracy; ``nan`` when empty.  The exact min and max bound the answer."""
        return float(self.quantiles([q])[0])

    def quantiles(self, qs: list[float] | np.ndarray) -> np.ndarray:
        q = np.asarray(qs, np.float64)
        if not self.count:
            return np.full(len(q), math.nan)
        ranks = np.floor(np.clip(q, 0.0, 1.0) * (self.count - 1)).astype(np.int64)
        # ascending order: negatives (largest magnitude first), zeros, positives
        neg_counts = self._neg[::-1]
        neg_idx = (self._neg_off + np.arange(len(self._neg)))[::-1]
        counts = np.concatenate([neg_counts, [self.zeros], self._pos])
        values = np.concatenate([-self._value(neg_idx), [0.0], self._value(self._pos_off + np.arange(len(self._pos)))])
        cum = np.cumsum(counts)
        at = np.searchsorted(cum, ranks, side="right")
        out = values[np.clip(at, 0, len(values) - 1)]
        return np.clip(out, self.min, self.max)

    def _value(self, idx: np.ndarray) -> np.ndarray:
        # the bucket's representative: 2 * gamma**i / (gamma + 1), within the accuracy of every value in it
        gamma = math.exp(self._gamma_log)
        return 2.0 * np.exp(idx * self._gamma_log) / (gamma + 1.0)

    @property
    def buckets(self) -> int:
        """Buckets held (the sketch's size)."""
        return len(self._pos) + len(self._neg) + 1

    def __repr__(self) -> str:
        return f"QuantileSketch(count={self.count}, accuracy={self.accuracy}, buckets={self.buckets})"
