"""The statistics of ``traceml compare``: verdict names, block bootstrap, intervals, effect size.

Pure functions on numpy arrays (no I/O, seeded).  Rules: docs/compare.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np

#: two-sided confidence of the intervals
CONFIDENCE = 0.95
#: the verdicts of one metric and of a whole comparison
REGRESSION = "REGRESSION"
IMPROVEMENT = "IMPROVEMENT"
EQUIVALENT = "EQUIVALENT"
INCONCLUSIVE = "INCONCLUSIVE"
VERDICTS = (REGRESSION, IMPROVEMENT, EQUIVALENT, INCONCLUSIVE)
DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
#: two-sided 95 % normal quantile
Z_95 = 1.959963984540054
#: floor on the relative standard error in the summary-only approximation
_MIN_REL_SE = 0.001
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


# --- per-run statistics, intervals, verdicts ---------------------------------------------------


QUANTILES = {"median": 0.5, "p95": 0.95}


def _stat(values: np.ndarray, statistic: str) -> float:
    return float(np.quantile(values, QUANTILES[statistic]))


def bootstrap_quantile(values: np.ndarray, q: float, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``resamples`` draws of the iid bootstrap distribution of the ``q`` quantile of ``values``.

    Exact and O(n log n + resamples): a resample's k-th order statistic is the sorted sample at
    index floor(n * U_(k)), where U_(k) ~ Beta(k, n - k + 1) is the k-th of n uniforms, and the
    next one is U_(k) + (1 - U_(k)) * Beta(1, n - k).  The quantile interpolates the two linearly,
    as ``np.quantile`` does.  (Kept for independent samples; ``compare`` resamples steps in
    blocks, :func:`run_bootstrap`.)
    """
    xs = np.sort(np.asarray(values, np.float64))
    n = len(xs)
    h = (n - 1) * q
    j = int(np.floor(h))
    frac = h - j
    k = j + 1  # 1-based order statistic below the quantile
    u1 = rng.beta(k, n - k + 1, size=resamples)
    u2 = u1 + (1 - u1) * rng.beta(1, n - k, size=resamples) if k < n else u1
    i1 = np.minimum((u1 * n).astype(np.int64), n - 1)
    i2 = np.minimum((u2 * n).astype(np.int64), n - 1)
    return np.asarray(xs[i1] * (1 - frac) + xs[i2] * frac)


def bootstrap_ratio(
    base: np.ndarray,
    new: np.ndarray,
    *,
    statistic: str = "median",
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    block: int | None = None,
) -> tuple[float, float, float]:
    """(ratio, low, high): NEW/BASE of ``statistic`` over two single-run series, 95 % interval.

    Circular block bootstrap; ``block`` defaults to the length rule of :func:`block_length`
    with the autocorrelation cutoff of both series.  Series of equal length are resampled
    pairwise (the same blocks on both sides).
    """
    base, new = np.asarray(base, np.float64), np.asarray(new, np.float64)
    b0, n0 = _stat(base, statistic), _stat(new, statistic)
    if b0 <= 0:
        return float("nan"), float("nan"), float("nan")
    lag = max(acf_cutoff(x, math.isqrt(len(x))) for x in (base, new))
    fn = RUN_STATISTICS[statistic]
    draws = []
    for x in (base, new):
        k = thinning(len(x))
        t = x[::k]
        L = block if block is not None else block_length(len(t), lag)
        draws.append(run_bootstrap([t], fn, L, resamples, seed) * recentre(fn, [x], [t]))
    with np.errstate(all="ignore"):
        lo, hi = percentile_interval(draws[1] / draws[0])
    return n0 / b0, lo, hi


def cliffs_delta(base: np.ndarray, new: np.ndarray) -> float:
    """P(new > base) - P(new < base) over all pairs, in O(n log n)."""
    b = np.sort(np.asarray(base, np.float64))
    x = np.asarray(new, np.float64)
    if not len(b) or not len(x):
        return float("nan")
    below = np.searchsorted(b, x, side="left").sum()  # pairs with base < new
    above = (len(b) - np.searchsorted(b, x, side="right")).sum()  # pairs with base > new
    return float(below - above) / (len(b) * len(x))


def _rel_se(median: float, p95: float, n: int) -> float:
    sigma = max(p95 - median, 0.0) / 1.6448536269514722
    se = 1.2533141373155 * sigma / math.sqrt(max(n, 1))
    return max(se / median, _MIN_REL_SE) if median > 0 else float("inf")


def approx_ratio(base: tuple[float, float, int], new: tuple[float, float, int]) -> tuple[float, float, float]:
    """(ratio, low, high) from (median, p95, n) of each side: normal approximation on the log scale."""
    (mb, pb, nb), (mn, pn, nn) = base, new
    if mb <= 0:
        return float("nan"), float("nan"), float("nan")
    ratio = mn / mb
    if ratio <= 0:
        return ratio, float("nan"), float("nan")
    s = math.sqrt(_rel_se(mb, pb, nb) ** 2 + _rel_se(mn, pn, nn) ** 2)
    return ratio, ratio * math.exp(-Z_95 * s), ratio * math.exp(Z_95 * s)


def verdict_for(ratio: float, lo: float, hi: float, gate: float, higher_is_better: bool, floor: float = 0.0) -> str:
    """Verdict from NEW/BASE and its interval with gate ``gate`` and noise floor ``floor`` (0.05 = 5 %).

    Oriented so that "worse" is above 1: REGRESSION when the estimate is worse than the gate and
    the interval lies above the noise floor (above 1 when drift is in the interval); IMPROVEMENT
    mirrored; EQUIVALENT when the whole interval lies within the gate; otherwise INCONCLUSIVE.
    """
    if not all(math.isfinite(v) for v in (ratio, lo, hi)) or ratio <= 0 or lo <= 0:
        return INCONCLUSIVE
    ratio, lo, hi = oriented(ratio, lo, hi, higher_is_better)
    if ratio > 1 + gate and lo > 1 + floor:
        return REGRESSION
    if ratio < 1 - gate and hi < 1 - floor:
        return IMPROVEMENT
    if lo >= 1 - gate and hi <= 1 + gate:
        return EQUIVALENT
    return INCONCLUSIVE


def _quantile_rows(statistic: str) -> RunStatistic:
    q = QUANTILES[statistic]

    def fn(cols: Sequence[np.ndarray]) -> np.ndarray:
        x = cols[0]
        if np.isnan(x).any():
            with np.errstate(all="ignore"):
                return np.asarray(np.nanquantile(x, q, axis=1))
        return np.asarray(np.quantile(x, q, axis=1))

    return fn


def _rate_rows(cols: Sequence[np.ndarray]) -> np.ndarray:
    """Steps per second over the resampled cycles: each rank's steps over the sum of its cycles
    (ms), the job's the slowest rank's.  ``cols`` are the ranks' cycle series."""
    rates = []
    for c in cols:
        ok = np.isfinite(c)
        with np.errstate(all="ignore"):
            rates.append(1000.0 * ok.sum(axis=1) / np.where(ok, c, 0.0).sum(axis=1))
    with np.errstate(all="ignore"):
        r = np.where(np.isfinite(np.stack(rates)), np.stack(rates), np.inf).min(axis=0)
    return np.asarray(np.where(np.isfinite(r), r, np.nan))


def _share_rows(cols: Sequence[np.ndarray]) -> np.ndarray:
    """Share of the resampled cycles' wall time spent outside any step, averaged over ranks.
    ``cols`` are the ranks' cycle series, then their outside series in the same order."""
    half = len(cols) // 2
    shares = []
    for c, o in zip(cols[:half], cols[half:], strict=True):
        ok = np.isfinite(c) & np.isfinite(o)
        with np.errstate(all="ignore"):
            shares.append(np.where(ok, o, 0.0).sum(axis=1) / np.where(ok, c, 0.0).sum(axis=1))
    with np.errstate(all="ignore"):
        return np.asarray(np.nanmean(np.stack(shares), axis=0))


RUN_STATISTICS: dict[str, RunStatistic] = {
    "median": _quantile_rows("median"),
    "p95": _quantile_rows("p95"),
    "rate": _rate_rows,
    "share": _share_rows,
}


def point_estimate(fn: RunStatistic, cols: Sequence[np.ndarray]) -> float:
    return float(fn([c[None, :] for c in cols])[0])


def recentre(fn: RunStatistic, full: Sequence[np.ndarray], thinned: Sequence[np.ndarray]) -> float:
    """Scale from a thinned run's statistic to the whole run's (1 when nothing was thinned)."""
    if len(full[0]) == len(thinned[0]):
        return 1.0
    a, b = point_estimate(fn, full), point_estimate(fn, thinned)
    return a / b if b > 0 and math.isfinite(a) and math.isfinite(b) else 1.0


def finite_count(cols: Sequence[np.ndarray]) -> int:
    ok = np.ones(len(cols[0]), bool)
    for c in cols:
        ok &= np.isfinite(c)
    return int(ok.sum())


def side_rel_se(stats: Sequence[tuple[float, float, int]]) -> float:
    """Relative standard error of a side's mean of run medians: within-run spread, plus between runs."""
    r = len(stats)
    within = sum(_rel_se(*s) ** 2 for s in stats) / r**2
    meds = np.array([s[0] for s in stats])
    between = float(np.var(meds, ddof=1) / meds.mean() ** 2 / r) if r > 1 and meds.mean() > 0 else 0.0
    return math.sqrt(within + between)
