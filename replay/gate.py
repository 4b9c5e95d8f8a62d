"""The statistics of the regression gate: block length, hierarchical block bootstrap, decisions.

Pure functions on numpy arrays (no I/O, seeded).  A *side* of a comparison is one or more runs;
each run is a set of per-step series.  A bootstrap resample picks the side's runs with
replacement, then resamples each picked run's steps in circular blocks (step times are
autocorrelated: a slow stretch lasts several steps).  Two runs of the same length share their
block draws, so aligned runs are compared pairwise and a run against itself differs by exactly
nothing.  Rules and their reasons: docs/compare.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np

#: two-sided confidence of the intervals
CONFIDENCE = 0.95
#: a run longer than this is thinned (every k-th step) before resampling: bounded cost per run
MAX_RESAMPLED_STEPS = 2048
#: resamples are evaluated in chunks of this many rows (bounded memory: rows x steps doubles)
_CHUNK = 256

#: per-run statistic of one resample: (values of each series at the resampled positions) -> value
RunStatistic = Callable[[Sequence[np.ndarray]], np.ndarray]


def acf_cutoff(x: np.ndarray, max_lag: int) -> int:
    """The smallest lag >= 1 at which the sample autocorrelation of ``x`` falls inside ±2/√n.

    ``max_lag`` when it never does up to there (a trend or a long slow stretch).
    """
    v = np.asarray(x, np.float64)
    v = v[np.isfinite(v)]
    n = len(v)
    if n < 4 or max_lag < 1:
        return 1
    d = v - v.mean()
    denom = float(d @ d)
    if denom <= 0:
        return 1  # constant: no dependence to preserve
    size = 1 << (2 * n - 1).bit_length()
    f = np.fft.rfft(d, size)
    acov = np.fft.irfft(f * np.conj(f), size)[: max_lag + 1]
    rho = acov / denom
    inside = np.nonzero(np.abs(rho[1:]) < 2 / math.sqrt(n))[0]
    return int(inside[0]) + 1 if len(inside) else max_lag


def block_length(n: int, dependence_lag: int = 1) -> int:
    """Block length for ``n`` steps: the dependence lag, clamped to [⌈n^(1/3)⌉, ⌊√n⌋].

    n^(1/3) is the classic order for block-bootstrap variance estimates; the autocorrelation
    cutoff lengthens blocks when slow stretches last longer; √n keeps at least √n blocks.
    """
    if n <= 1:
        return 1
    lo = math.ceil(n ** (1 / 3) - 1e-9)
    hi = max(lo, math.isqrt(n))
    return int(min(max(dependence_lag, lo), hi))


def thinning(n: int) -> int:
    """Keep every k-th step of a run of ``n`` steps when resampling (1 = all)."""
    return max(1, math.ceil(n / MAX_RESAMPLED_STEPS))


@functools.lru_cache(maxsize=4)
def block_indices(n: int, block: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) int32 positions of a circular block bootstrap of ``n`` steps.

    Deterministic in (n, block, seed): every series of the same length gets the same draws,
    which pairs aligned runs (and makes a run against itself exactly equal).  The last few are
    cached (read-only): every metric of a run reuses them.
    """
    block = max(1, min(block, n))
    rng = np.random.default_rng([seed, n, block])
    blocks = math.ceil(n / block)
    starts = rng.integers(0, n, size=(resamples, blocks), dtype=np.int64)
    idx = (starts[:, :, None] + np.arange(block)[None, None, :]) % n
    out = np.ascontiguousarray(idx.reshape(resamples, blocks * block)[:, :n], dtype=np.int32)
    out.setflags(write=False)
    return out


def run_bootstrap(
    series: Sequence[np.ndarray], statistic: RunStatistic, block: int, resamples: int, seed: int
) -> np.ndarray:
    """``resamples`` values of ``statistic`` over circular-block resamples of one run's series.

    ``series`` are equally long per-step arrays (already thinned); ``block`` is this length's
    block length.
    """
    n = len(series[0])
    idx = block_indices(n, block, resamples, seed)
    out = np.empty(resamples)
    for a in range(0, resamples, _CHUNK):
        rows = idx[a : a + _CHUNK]
        out[a : a + len(rows)] = statistic([s[rows] for s in series])
    return out


def combine_runs(per_run: Sequence[np.ndarray], resamples: int, seed: int) -> np.ndarray:
    """A side's bootstrap: resample its runs with replacement, average their resampled statistics.

    ``per_run[j][b]`` is run j's statistic in within-run resample b.  Slot k of resample b reads
    row ``(b + k * stride) % resamples`` so that a run picked twice gets two different resamples,
    while slot 0 reads row b (one run per side: the two sides' rows stay paired).  Two sides
    combined with the same ``seed`` and run count pick the same run indices: paired runs.
    """
    runs = len(per_run)
    if runs == 1:
        return np.asarray(per_run[0], np.float64)
    rng = np.random.default_rng([seed, runs, 7919])
    picks = rng.integers(0, runs, size=(resamples, runs))
    stack = np.stack([np.asarray(p, np.float64) for p in per_run])  # (runs, resamples)
    stride = max(1, resamples // runs)
    b = np.arange(resamples)
    total = np.zeros(resamples)
    for k in range(runs):
        total += stack[picks[:, k], (b + k * stride) % resamples]
    return total / runs


def percentile_interval(draws: np.ndarray) -> tuple[float, float]:
    d = np.asarray(draws, np.float64)
    d = d[np.isfinite(d)]
    if not len(d):
        return float("nan"), float("nan")
    alpha = (1 - CONFIDENCE) / 2
    lo, hi = np.quantile(d, [alpha, 1 - alpha])
    return float(lo), float(hi)


def oriented(ratio: float, lo: float, hi: float, higher_is_better: bool) -> tuple[float, float, float]:
    """The ratio and interval turned so that "worse" is above 1 (throughput is inverted)."""
    if higher_is_better:
        return 1 / ratio, 1 / hi, 1 / lo
    return ratio, lo, hi


def steps_to_decide(n: int, ratio: float, lo: float, hi: float, gate: float, floor: float) -> int | None:
    """About how many steps per run would turn an undecided interval into a verdict.

    Assumes the interval narrows as 1/√n around the same estimate (within-run noise dominates).
    ``None`` when more steps cannot settle it: the estimate sits on the gate or between the
    gate and the noise floor (only more runs, or a smaller measured floor, can), or it would take
    more than :data:`MAX_STEPS_FACTOR` times the steps there are.  Oriented.
    """
    if n < 1 or not all(math.isfinite(v) for v in (ratio, lo, hi)):
        return None
    edge = max(gate, floor)
    if ratio > 1 + edge:
        width, room = ratio - lo, ratio - (1 + floor)
    elif ratio < 1 - edge:
        width, room = hi - ratio, (1 - floor) - ratio
    elif 1 - gate < ratio < 1 + gate:
        factor = max((hi - ratio) / (1 + gate - ratio), (ratio - lo) / (ratio - (1 - gate)))
        return _bounded(n, factor) if factor > 1 else None
    else:
        return None
    if room <= 0 or width <= room:
        return None
    return _bounded(n, width / room)


#: a "would decide it" beyond this many times the current steps is not worth printing
MAX_STEPS_FACTOR = 100


def _bounded(n: int, factor: float) -> int | None:
    need = math.ceil(n * factor**2)
    return need if need <= MAX_STEPS_FACTOR * n else None
