"""Many ranks at a glance: the distribution of the ranks' step times instead of a line per rank.

Pure: view models in, view models out (:func:`rank_spread`, :func:`rank_band`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from traceml.errors import ConfigError
from traceml.views.downsample import Trace
from traceml.views.live import LiveModel, RankRow
from traceml.views.series import RankSteps

#: the most ranks a filter may name (a spec like ``0-99999999`` is refused, not expanded)
MAX_FILTER_RANKS = 1 << 20
#: above this many ranks the charts draw a band and the slowest ranks instead of one line each
WIDE_RANKS = 16
WORST_K = 5


@dataclass(frozen=True)
class RankSpread:
    #: ranks with a measured step median
    measured: int
    median_us: float
    p95_us: float
    #: (rank, step median µs), slowest first
    worst: tuple[tuple[int, float], ...]
    #: (state, ranks), most common first
    states: tuple[tuple[str, int], ...]


def rank_spread(ranks: Sequence[RankRow], k: int = WORST_K) -> RankSpread:
    medians = [(r.rank, r.step_median_us) for r in ranks if not math.isnan(r.step_median_us)]
    values = np.array([m for _, m in medians], dtype=np.float64)
    worst = tuple(sorted(medians, key=lambda rm: (-rm[1], rm[0]))[:k])
    return RankSpread(
        measured=len(medians),
        median_us=float(np.median(values)) if len(values) else math.nan,
        p95_us=float(np.percentile(values, 95)) if len(values) else math.nan,
        worst=worst,
        states=tuple(Counter(r.state for r in ranks).most_common()),
    )


@dataclass(frozen=True)
class RankBand:
    """Step time across ranks per step bucket (ms), and the slowest ranks' own lines."""

    x: np.ndarray  # first step of each bucket
    median_ms: np.ndarray
    p95_ms: np.ndarray
    max_ms: np.ndarray
    ranks: int
    worst: tuple[Trace, ...]


def rank_band(model: RankSteps, k: int = WORST_K) -> RankBand:
    heat = model.heat_ms
    if heat.size == 0:
        empty = np.empty(0)
        return RankBand(empty, empty, empty, empty, 0, ())
    with warnings.catch_warnings():  # a bucket no rank reached is nan, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(heat, axis=0)
        p95 = np.nanpercentile(heat, 95, axis=0)
        top = np.nanmax(heat, axis=0)
    medians = {s.rank: s.median_ms for s in model.stats}
    if not any(math.isfinite(v) for v in medians.values()):  # a rollup: ranks by their mean
        medians = {s.rank: s.mean_ms for s in model.stats}
    slowest = sorted((r for r in medians if math.isfinite(medians[r])), key=lambda r: (-medians[r], r))[:k]
    by_rank = {t.rank: t for t in model.traces}
    return RankBand(
        x=np.asarray(model.heat_steps),
        median_ms=median,
        p95_ms=p95,
        max_ms=top,
        ranks=len(model.heat_ranks),
        worst=tuple(by_rank[r] for r in slowest if r in by_rank),
    )


def parse_rank_filter(spec: str) -> frozenset[int]:
    """``"0-15, 300"`` -> {0, ..., 15, 300}: ranks and inclusive ranges, comma-separated."""
    ranks: set[int] = set()
    for part in spec.split(","):
        text = part.strip()
        if not text:
            continue
        lo, sep, hi = text.partition("-")
        try:
            first = int(lo)
            last = int(hi) if sep else first
        except ValueError:
            raise ConfigError(
                f"rank filter {spec!r}: {text!r} is not a rank or a range; expected e.g. 0-15,300"
            ) from None
        if first < 0 or last < first or len(ranks) + (last - first + 1) > MAX_FILTER_RANKS:
            raise ConfigError(
                f"rank filter {spec!r}: {text!r} is not a range of ranks >= 0 (at most {MAX_FILTER_RANKS:,});"
                " expected e.g. 0-15,300"
            )
        ranks.update(range(first, last + 1))
    if not ranks:
        raise ConfigError(f"rank filter {spec!r} names no rank; expected e.g. 0-15,300")
    return frozenset(ranks)


def filter_ranks(model: LiveModel, ranks: frozenset[int]) -> LiveModel:
    """The live model with only *ranks* in its rank table (and so in its distribution line)."""
    return dataclasses.replace(model, ranks=tuple(r for r in model.ranks if r.rank in ranks))
