"""``traceml compare``: a verdict per metric with a confidence, and a CI gate that tells change from noise.

Each side is one or more runs: recordings (``.tml``: full step series) or ``summary.json`` files
(medians, p95 and step counts only).  Steps are aligned on the step numbers every run has, after
the warm-up and failed steps are removed (the diagnosis rules, docs/diagnosis.md).

Confidence: with recordings only, a seeded hierarchical bootstrap (runs with replacement, then
circular blocks of steps within each run; :mod:`replay.gate`) gives a 95 % interval of the
ratio NEW/BASE.  With one run on a side, run-to-run drift is not in that interval, so a
regression must also clear a noise floor (``--noise-floor``, or measured from an A/A pair).
With a summary on either side, the interval is a normal approximation from each run's median,
p95 and step count: lower confidence, and the output says so.  Rules: docs/compare.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from replay import gate as g
from traceml import escape as esc
from traceml.diagnosis import SCHEMA_VERSION as SUMMARY_SCHEMA_VERSION
from traceml.diagnosis import job_series, step_data
from traceml.diagnosis.summary import traceml_section
from traceml.errors import ReportError
from traceml.outpaths import OutputDir
from traceml.schema import PHASES
from traceml.store import StoreView
from traceml.units import fmt_bytes
from traceml.views.final import traceml_cost_text

#: compare.json schema (2: several runs per side, noise floor, measured throughput, outside-step share)
SCHEMA_VERSION = 2
REGRESSION = "REGRESSION"
IMPROVEMENT = "IMPROVEMENT"
EQUIVALENT = "EQUIVALENT"
INCONCLUSIVE = "INCONCLUSIVE"
VERDICTS = (REGRESSION, IMPROVEMENT, EQUIVALENT, INCONCLUSIVE)

EXIT_PASS = 0
EXIT_ERROR = 1
EXIT_INCONCLUSIVE = 3
EXIT_REGRESSION = 4

DEFAULT_MAX_REGRESSION_PCT = 5.0
#: with one run per side and no measured floor, a timing change must clear this much drift
DEFAULT_NOISE_FLOOR_PCT = 10.0
DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
CONFIDENCE = g.CONFIDENCE
#: fewer samples than this in a run and a metric is INCONCLUSIVE
MIN_SAMPLES = 10
#: runs per side (each is loaded whole; the bootstrap cost grows with it)
MAX_RUNS_PER_SIDE = 64
#: floor on the relative standard error in the summary-only approximation
_MIN_REL_SE = 0.001
_Z = 1.959963984540054  # two-sided 95 %

COMPARE_HTML = "compare.html"
COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    label: str
    unit: str
    higher_is_better: bool
    gated: bool
    #: "median" | "p95" (memory) | "rate" (steps over wall time) | "share" (outside-step share of wall time)
    statistic: str

    @property
    def additive(self) -> bool:
        """Compared as a difference (percentage points), not a ratio: a share of wall time."""
        return self.statistic == "share"

    @property
    def timing(self) -> bool:
        """Subject to run-to-run drift on a shared host (the noise floor applies)."""
        return self.statistic != "p95"


def metric_specs() -> list[MetricSpec]:
    specs = [
        MetricSpec("step_time", "step time", "ms", False, True, "median"),
        MetricSpec("throughput", "throughput", "steps/s", True, True, "rate"),
        MetricSpec("outside_share", "time outside steps", "% of wall", False, True, "share"),
    ]
    specs += [MetricSpec(f"phase.{p}", f"{p}", "ms", False, False, "median") for p in PHASES]
    specs += [
        MetricSpec("peak_gpu_memory", "peak GPU memory", "bytes", False, True, "p95"),
        MetricSpec("peak_rss", "peak host RSS", "bytes", False, True, "p95"),
    ]
    return specs


@dataclass(frozen=True)
class Side:
    """One run: a recording's per-step series, or a summary's statistics."""

    path: str
    kind: str  # "recording" | "summary"
    run_id: str
    name: str
    steps: int
    #: metric -> per-step samples (recordings); ``cycle@<rank>`` and ``outside@<rank>`` are ms per step
    #: (end of the previous step to the end of this one, and the part of it outside the step)
    series: Mapping[str, np.ndarray] = field(default_factory=dict)
    #: metric -> (median, p95, n) (summaries)
    stats: Mapping[str, tuple[float, float, int]] = field(default_factory=dict)
    step_numbers: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    #: "traceml cost X µs per step (Y%)" of this run; "" when it did not measure it
    cost: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "run_id": self.run_id, "name": self.name, "steps": self.steps}


@dataclass(frozen=True)
class MetricResult:
    spec: MetricSpec
    base: float | None
    new: float | None
    #: NEW/BASE; for a share, 1 + (NEW - BASE)
    ratio: float | None
    ci_low: float | None
    ci_high: float | None
    n_base: int
    n_new: int
    effect_size: float | None
    verdict: str
    note: str = ""
    #: the drift a change must clear (fraction; percentage points for a share)
    noise_floor: float = 0.0
    #: steps per run that would likely decide an INCONCLUSIVE metric
    steps_to_decide: int | None = None

    @property
    def change_pct(self) -> float | None:
        """Percent change (percentage points of wall time for a share)."""
        return None if self.ratio is None else (self.ratio - 1) * 100

    @property
    def new_in_new(self) -> bool:
        """Zero in the base, present in the new run: no ratio, printed as "new"."""
        return self.base is not None and self.base <= 0 and self.new is not None and self.new > 0

    def to_dict(self) -> dict[str, Any]:
        def r(x: float | None, nd: int = 6) -> float | None:
            return None if x is None or not math.isfinite(x) else round(x, nd)

        return {
            "name": self.spec.name,
            "label": self.spec.label,
            "unit": self.spec.unit,
            "direction": "higher_is_better" if self.spec.higher_is_better else "lower_is_better",
            "statistic": self.spec.statistic,
            "gated": self.spec.gated,
            "base": r(self.base),
            "new": r(self.new),
            "ratio": None if self.spec.additive else r(self.ratio),
            "change_pct": r(self.change_pct, 3),
            "change_unit": "pp" if self.spec.additive else "%",
            "ci_low_pct": None if self.ci_low is None else r((self.ci_low - 1) * 100, 3),
            "ci_high_pct": None if self.ci_high is None else r((self.ci_high - 1) * 100, 3),
            "n_base": self.n_base,
            "n_new": self.n_new,
            "effect_size": r(self.effect_size, 4),
            "noise_floor_pct": r(self.noise_floor * 100, 3),
            "steps_to_decide": self.steps_to_decide,
            "verdict": self.verdict,
            "note": self.note,
        }


@dataclass(frozen=True)
class Comparison:
    base_runs: tuple[Side, ...]
    new_runs: tuple[Side, ...]
    metrics: list[MetricResult]
    gate_pct: float
    method: str  # "bootstrap" | "approximate"
    seed: int
    resamples: int
    aligned: tuple[int, int, int] | None  # first, last, count of aligned steps
    block: int | None  # steps per resampled block (bootstrap)
    drift_covered: bool  # both sides have several runs: run-to-run drift is in the interval
    paired: bool  # the i-th base and new runs ran back to back and are resampled together
    floor_source: str  # where the noise floor of the timing metrics comes from
    aa_runs: tuple[Side, ...]
    verdict: str
    exit_code: int
    reason: str

    @property
    def base(self) -> Side:
        return self.base_runs[0]

    @property
    def new(self) -> Side:
        return self.new_runs[0]

    @property
    def noise_floor_pct(self) -> float:
        """The step-time noise floor in percent (each timing metric's own is in its result)."""
        return next((m.noise_floor * 100 for m in self.metrics if m.spec.name == "step_time"), 0.0)

    def to_dict(self) -> dict[str, Any]:
        def side(runs: tuple[Side, ...]) -> dict[str, Any]:
            return {**runs[0].to_dict(), "run_count": len(runs), "runs": [s.to_dict() for s in runs]}

        return {
            "schema_version": SCHEMA_VERSION,
            "base": side(self.base_runs),
            "new": side(self.new_runs),
            "gate_pct": self.gate_pct,
            "confidence_level": CONFIDENCE,
            "method": self.method,
            "method_note": METHOD_NOTES[self.method],
            "seed": self.seed,
            "resamples": self.resamples if self.method == "bootstrap" else 0,
            "block_steps": self.block,
            "aligned_steps": None
            if self.aligned is None
            else {"first": self.aligned[0], "last": self.aligned[1], "count": self.aligned[2]},
            "drift_covered": self.drift_covered,
            "paired": self.paired,
            "noise_floor": {
                "pct": round(self.noise_floor_pct, 3),
                "source": self.floor_source,
                "aa": [s.to_dict() for s in self.aa_runs],
            },
            "metrics": [m.to_dict() for m in self.metrics],
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "reason": self.reason,
        }


METHOD_NOTES = {
    "bootstrap": (
        "95% interval of NEW/BASE from a seeded hierarchical bootstrap: runs resampled with replacement, then "
        "circular blocks of steps within each run (median; p95 for memory; throughput and the outside-step share "
        "measured over wall time); effect size = Cliff's delta"
    ),
    "approximate": (
        "lower confidence: at least one input is a summary.json, so there are no step distributions; the "
        "interval is a normal approximation from each run's median, p95 and step count"
    ),
}


# --- statistics (pure) ---------------------------------------------------------------------------


_QUANTILE = {"median": 0.5, "p95": 0.95}


def _stat(values: np.ndarray, statistic: str) -> float:
    return float(np.quantile(values, _QUANTILE[statistic]))


def bootstrap_quantile(values: np.ndarray, q: float, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``resamples`` draws of the iid bootstrap distribution of the ``q`` quantile of ``values``.

    Exact and O(n log n + resamples): a resample's k-th order statistic is the sorted sample at
    index floor(n * U_(k)), where U_(k) ~ Beta(k, n - k + 1) is the k-th of n uniforms, and the
    next one is U_(k) + (1 - U_(k)) * Beta(1, n - k).  The quantile interpolates the two linearly,
    as ``np.quantile`` does.  (Kept for independent samples; ``compare`` resamples steps in
    blocks, :mod:`replay.gate`.)
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

    Circular block bootstrap; ``block`` defaults to the length rule of :func:`replay.gate.block_length`
    with the autocorrelation cutoff of both series.  Series of equal length are resampled
    pairwise (the same blocks on both sides).
    """
    base, new = np.asarray(base, np.float64), np.asarray(new, np.float64)
    b0, n0 = _stat(base, statistic), _stat(new, statistic)
    if b0 <= 0:
        return float("nan"), float("nan"), float("nan")
    lag = max(g.acf_cutoff(x, math.isqrt(len(x))) for x in (base, new))
    fn = _RUN_STATS[statistic]
    draws = []
    for x in (base, new):
        k = g.thinning(len(x))
        t = x[::k]
        L = block if block is not None else g.block_length(len(t), lag)
        draws.append(g.run_bootstrap([t], fn, L, resamples, seed) * _recentre(fn, [x], [t]))
    with np.errstate(all="ignore"):
        lo, hi = g.percentile_interval(draws[1] / draws[0])
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
    return ratio, ratio * math.exp(-_Z * s), ratio * math.exp(_Z * s)


def verdict_for(ratio: float, lo: float, hi: float, gate: float, higher_is_better: bool, floor: float = 0.0) -> str:
    """Verdict from NEW/BASE and its interval with gate ``gate`` and noise floor ``floor`` (0.05 = 5 %).

    Oriented so that "worse" is above 1: REGRESSION when the estimate is worse than the gate and
    the interval lies above the noise floor (above 1 when drift is in the interval); IMPROVEMENT
    mirrored; EQUIVALENT when the whole interval lies within the gate; otherwise INCONCLUSIVE.
    """
    if not all(math.isfinite(v) for v in (ratio, lo, hi)) or ratio <= 0 or lo <= 0:
        return INCONCLUSIVE
    ratio, lo, hi = g.oriented(ratio, lo, hi, higher_is_better)
    if ratio > 1 + gate and lo > 1 + floor:
        return REGRESSION
    if ratio < 1 - gate and hi < 1 - floor:
        return IMPROVEMENT
    if lo >= 1 - gate and hi <= 1 + gate:
        return EQUIVALENT
    return INCONCLUSIVE


def _quantile_rows(statistic: str) -> g.RunStatistic:
    q = _QUANTILE[statistic]

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


_RUN_STATS: dict[str, g.RunStatistic] = {
    "median": _quantile_rows("median"),
    "p95": _quantile_rows("p95"),
    "rate": _rate_rows,
    "share": _share_rows,
}
#: prefixes of the per-rank wall-time series (``cycle@0``, ``outside@0``, ...)
_CYCLE, _OUTSIDE = "cycle@", "outside@"


def _rank_keys(run: Side, prefix: str) -> list[str]:
    keys = [k for k in run.series if k.startswith(prefix)]
    return sorted(keys, key=lambda k: int(k[len(prefix) :]))


def _series_for(spec: MetricSpec, run: Side) -> list[np.ndarray] | None:
    if spec.statistic in ("rate", "share"):
        cycles = _rank_keys(run, _CYCLE)
        names = cycles if spec.statistic == "rate" else cycles + [_OUTSIDE + k[len(_CYCLE) :] for k in cycles]
        if not cycles or any(n not in run.series for n in names):
            return None
    else:
        names = [spec.name]
    cols = [run.series.get(n) for n in names]
    if any(c is None for c in cols):
        return None
    return [np.asarray(c, np.float64) for c in cols if c is not None]


def _point(fn: g.RunStatistic, cols: Sequence[np.ndarray]) -> float:
    return float(fn([c[None, :] for c in cols])[0])


def _recentre(fn: g.RunStatistic, full: Sequence[np.ndarray], thinned: Sequence[np.ndarray]) -> float:
    """Scale from a thinned run's statistic to the whole run's (1 when nothing was thinned)."""
    if len(full[0]) == len(thinned[0]):
        return 1.0
    a, b = _point(fn, full), _point(fn, thinned)
    return a / b if b > 0 and math.isfinite(a) and math.isfinite(b) else 1.0


def _finite_count(cols: Sequence[np.ndarray]) -> int:
    ok = np.ones(len(cols[0]), bool)
    for c in cols:
        ok &= np.isfinite(c)
    return int(ok.sum())


# --- inputs ----------------------------------------------------------------------------------------


def _memory_series(view: StoreView, data: Any) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    peaks: list[np.ndarray] = []
    for r in view.table_ranks("step_memory"):
        cols = view.columns("step_memory", r)
        keep = np.isin(np.asarray(cols["step"], np.int64), data.steps)
        v = np.asarray(cols["peak_alloc_bytes"], np.float64)[keep]
        peaks.append(v[v >= 0])
    if any(len(p) for p in peaks):
        # the rank with the highest peak: memory limits bite on the fullest device
        out["peak_gpu_memory"] = max(peaks, key=lambda p: p.max() if len(p) else -1.0)
    span = data.time_range()
    rss_by_rank: list[np.ndarray] = []
    gpu_by_rank: list[np.ndarray] = []
    for r in view.table_ranks("process"):
        cols = view.columns("process", r)
        ts = np.asarray(cols["ts_ns"], np.int64)
        keep = np.ones(len(ts), bool) if span is None else (ts >= span[0]) & (ts <= span[1])
        rss = np.asarray(cols["rss_bytes"], np.float64)[keep]
        gpu = np.asarray(cols["gpu_alloc_bytes"], np.float64)[keep]
        rss_by_rank.append(rss[rss >= 0])
        gpu_by_rank.append(gpu[gpu >= 0])
    if any(len(p) for p in rss_by_rank):
        out["peak_rss"] = max(rss_by_rank, key=lambda p: p.max() if len(p) else -1.0)
    if "peak_gpu_memory" not in out and any(len(p) for p in gpu_by_rank):
        out["peak_gpu_memory"] = max(gpu_by_rank, key=lambda p: p.max() if len(p) else -1.0)
    return out


def _cycle_series(data: Any) -> dict[str, np.ndarray]:
    """Per rank and analysed step (ms, aligned on ``data.steps``; ``nan`` where the rank lacks the
    step): ``cycle@<rank>``, the wall time the step accounts for, and ``outside@<rank>``, the part
    of it outside any analysed step.

    A step's cycle runs from the end of the rank's previous analysed step to the end of this one
    (``ts_ns`` of consecutive rows; a failed step dropped between them counts as outside time);
    the first analysed step's cycle is its own step time.  Summed, a rank's cycles are its elapsed
    wall time from the start of its first analysed step to the end of its last, so steps / sum of
    cycles is its measured throughput and sum(outside) / sum(cycles) its share of wall time outside
    any step (evaluation, checkpointing, logging, a slow batch between steps): the definitions of
    :mod:`traceml.views.measures`, which the report and the views quote.
    """
    out: dict[str, np.ndarray] = {}
    for r in data.ranks:
        rs = data.per_rank[r]
        if not len(rs.step):
            continue
        step_ms = np.asarray(rs.step_us, np.float64) / 1000.0
        with np.errstate(all="ignore"):
            dt_ms = np.diff(rs.ts_ns.astype(np.float64)) / 1e6
            c = np.concatenate(([step_ms[0]], np.where(dt_ms >= 0, dt_ms, np.nan)))
            o = np.concatenate(([0.0], np.clip(c[1:] - step_ms[1:], 0.0, None)))
        o = np.where(np.isfinite(c), o, np.nan)
        pos = np.searchsorted(data.steps, rs.step)
        cyc = np.full(len(data.steps), np.nan)
        outside = np.full(len(data.steps), np.nan)
        cyc[pos], outside[pos] = c, o
        out[f"{_CYCLE}{r}"], out[f"{_OUTSIDE}{r}"] = cyc, outside
    return out


def side_from_view(view: StoreView, path: str = "") -> Side:
    """A recording: per-step job series (warm-up and failed steps removed) and its wall-time cycles."""
    data = step_data(view)
    job = job_series(data)
    series: dict[str, np.ndarray] = {"step_time": job["step"] / 1000}
    for p in PHASES:
        series[f"phase.{p}"] = job[p] / 1000
    series.update(_cycle_series(data))
    series.update(_memory_series(view, data))
    return Side(
        path=path,
        kind="recording",
        run_id=str(view.meta.get("run_id", "") or ""),
        name=str(view.meta.get("run_name", "") or ""),
        steps=len(data.steps),
        series=series,
        step_numbers=data.steps,
        cost=traceml_cost_text(
            {"traceml": traceml_section(view, float(np.median(job["step"])) / 1000 if len(job["step"]) else None)}
        ),
    )


def side_from_summary(summary: Mapping[str, Any], path: str = "") -> Side:
    """A summary.json: per-metric (median, p95, n) from the summary's statistics."""
    version = summary.get("schema_version")
    if not isinstance(version, int) or "steps" not in summary:
        raise ReportError(
            f"{path or 'summary'}: expected a traceml summary.json (with schema_version and steps); "
            f"found keys {sorted(summary)[:8]}"
        )
    if version > SUMMARY_SCHEMA_VERSION:
        raise ReportError(
            f"{path}: summary schema_version {version} is newer than this traceml understands "
            f"({SUMMARY_SCHEMA_VERSION}); upgrade traceml"
        )
    steps = summary.get("steps") or {}
    n = int(steps.get("count") or 0)
    overall = steps.get("overall") or {}
    stats: dict[str, tuple[float, float, int]] = {}

    def add(metric: str, stat: Mapping[str, Any] | None) -> None:
        if stat and stat.get("median_ms") is not None and stat.get("p95_ms") is not None:
            stats[metric] = (float(stat["median_ms"]), float(stat["p95_ms"]), n)

    add("step_time", overall.get("step"))
    for p in PHASES:
        add(f"phase.{p}", overall.get(p))
    if "step_time" in stats:
        med, p95, _ = stats["step_time"]
        tput = steps.get("throughput_steps_per_s")
        rate = float(tput) if isinstance(tput, int | float) and tput > 0 else (1000 / med if med > 0 else 0.0)
        if rate > 0 and med > 0:
            # steps/s carries the step time's relative uncertainty (its p95 mirrored below the rate)
            stats["throughput"] = (rate, rate * (1 + (p95 - med) / med), n)
    share = steps.get("outside_step_share")
    if isinstance(share, int | float) and math.isfinite(share) and 0 <= share <= 1:
        stats["outside_share"] = (float(share), float(share), n)  # one figure per run: no spread
    memory = summary.get("memory") or {}
    for metric, key in (("peak_gpu_memory", "peak_gpu_alloc_bytes"), ("peak_rss", "peak_rss_bytes")):
        if memory.get(key) is not None:
            v = float(memory[key])
            stats[metric] = (v, v, 1)
    run = summary.get("run") or {}
    return Side(
        path=path,
        kind="summary",
        run_id=str(run.get("id", "") or ""),
        name=str(run.get("name", "") or ""),
        steps=n,
        stats=stats,
        cost=traceml_cost_text(summary),
    )


def _stats_of(spec: MetricSpec, run: Side) -> tuple[float, float, int] | None:
    """(median, p95, n) of a recording's metric for the approximate comparison."""
    if spec.statistic == "share":
        cols = _series_for(spec, run)
        if cols is None or _finite_count(cols) == 0:
            return None
        with np.errstate(all="ignore"):
            share = _point(_share_rows, cols)
        return (share, share, _finite_count(cols)) if math.isfinite(share) else None
    if spec.statistic == "rate":
        cols = _series_for(spec, run)
        step = run.series.get("step_time")
        if cols is None or step is None:
            return None
        rate = _point(_rate_rows, cols)
        v = step[np.isfinite(step)]
        if not len(v) or not math.isfinite(rate):
            return None
        med, p95 = float(np.median(v)), float(np.percentile(v, 95))
        return (rate, rate * (1 + (p95 - med) / med) if med > 0 else rate, len(v))
    if spec.name not in run.series:
        return None
    values = run.series[spec.name]
    v = values[np.isfinite(values)]
    if not len(v):
        return (float("nan"), float("nan"), 0)
    if spec.statistic == "p95":  # memory: a summary carries only the peak, so compare peaks
        p = float(np.max(v))
        return (p, p, len(v))
    return (float(np.median(v)), float(np.percentile(v, 95)), len(v))


def _aligned(runs: Sequence[Side]) -> tuple[list[Side], tuple[int, int, int] | None]:
    """Restrict every recording's step series to the step numbers all of them have (when enough overlap)."""
    common: np.ndarray | None = None
    for s in runs:
        common = s.step_numbers if common is None else np.intersect1d(common, s.step_numbers)
    if common is None or len(common) < MIN_SAMPLES:
        return list(runs), None

    def cut(s: Side) -> Side:
        keep = np.isin(s.step_numbers, common)
        series = {
            k: (v[keep] if len(v) == len(s.step_numbers) and not k.startswith("peak_") else v)
            for k, v in s.series.items()
        }
        return Side(s.path, s.kind, s.run_id, s.name, len(common), series, s.stats, s.step_numbers[keep], s.cost)

    return [cut(s) for s in runs], (int(common[0]), int(common[-1]), len(common))


# --- the comparison --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Floors:
    """Per timing metric: the drift a change must clear, and where that figure comes from."""

    value: Mapping[str, float]
    source: str
    drift_covered: bool

    def of(self, spec: MetricSpec) -> float:
        return self.value.get(spec.name, 0.0) if spec.timing else 0.0


def _as_runs(x: Side | Sequence[Side], what: str) -> tuple[Side, ...]:
    runs = (x,) if isinstance(x, Side) else tuple(x)
    if not runs:
        raise ReportError(f"no {what} run given; pass at least one recording or summary.json")
    if len(runs) > MAX_RUNS_PER_SIDE:
        raise ReportError(f"{len(runs)} {what} runs given; at most {MAX_RUNS_PER_SIDE} per side")
    return runs


def compare_sides(
    base: Side | Sequence[Side],
    new: Side | Sequence[Side],
    *,
    max_regression_pct: float = DEFAULT_MAX_REGRESSION_PCT,
    noise_floor_pct: float | None = None,
    aa: Sequence[Side] = (),
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    paired: bool = False,
) -> Comparison:
    """Compare one or more BASE runs with one or more NEW runs.

    ``noise_floor_pct`` (percent) is the run-to-run drift a timing change must clear; ``aa``
    are A/A partners of the first base run (the same code run again) from which the floor is
    measured instead.  Without either, the floor is 0 when both sides have several runs (drift is
    in the interval), measured from the spread of the side that has several, else
    :data:`DEFAULT_NOISE_FLOOR_PCT`.  ``paired``: the i-th base and i-th new run ran back to back
    (interleaved), so the run resampling picks them together and drift they share cancels.
    """
    if not (max_regression_pct > 0 and math.isfinite(max_regression_pct)):
        raise ReportError(f"--max-regression must be a positive percentage; found {max_regression_pct}")
    if noise_floor_pct is not None and not (noise_floor_pct >= 0 and math.isfinite(noise_floor_pct)):
        raise ReportError(f"--noise-floor must be a percentage >= 0, e.g. 8; found {noise_floor_pct}")
    if noise_floor_pct is not None and aa:
        raise ReportError("give either --noise-floor or --aa (a floor measured from an A/A pair), not both")
    base_runs, new_runs = _as_runs(base, "base"), _as_runs(new, "new")
    if paired and len(base_runs) != len(new_runs):
        raise ReportError(
            f"--paired needs as many --new runs as --base runs (the i-th of each ran back to back); "
            f"found {len(base_runs)} base and {len(new_runs)} new"
        )
    aa_runs = tuple(aa)
    gate = max_regression_pct / 100
    everything = (*base_runs, *new_runs, *aa_runs)
    bootstrap = all(s.kind == "recording" for s in everything)
    aligned: tuple[int, int, int] | None = None
    block: int | None = None
    lag = 1
    if bootstrap:
        cut, aligned = _aligned(everything)
        nb, nn = len(base_runs), len(new_runs)
        base_runs, new_runs, aa_runs = tuple(cut[:nb]), tuple(cut[nb : nb + nn]), tuple(cut[nb + nn :])
        lag = _dependence_lag((*base_runs, *new_runs))
        n0 = len(base_runs[0].series.get("step_time", ()))
        block = g.block_length(len(range(0, n0, g.thinning(n0))), lag) if n0 else None
    ctx = _Context(gate, bootstrap, resamples, seed, lag, paired)
    floors = _floors(base_runs, new_runs, aa_runs, noise_floor_pct, ctx)
    results = [_compare_metric(spec, base_runs, new_runs, ctx, floors.of(spec)) for spec in metric_specs()]
    results = _phase_zero_rules(results, gate)
    verdict, code, reason = _overall(results, max_regression_pct, floors)
    return Comparison(
        base_runs=base_runs,
        new_runs=new_runs,
        metrics=results,
        gate_pct=max_regression_pct,
        method="bootstrap" if bootstrap else "approximate",
        seed=seed,
        resamples=resamples,
        aligned=aligned,
        block=block,
        drift_covered=floors.drift_covered,
        paired=paired,
        floor_source=floors.source,
        aa_runs=aa_runs,
        verdict=verdict,
        exit_code=code,
        reason=reason,
    )


@dataclass(frozen=True)
class _Context:
    gate: float
    bootstrap: bool
    resamples: int
    seed: int
    lag: int  # dependence lag of the step-time series (block length rule)
    paired: bool = False  # base and new runs resampled as pairs (the same run picks on both sides)


def _dependence_lag(runs: Sequence[Side]) -> int:
    lag = 1
    for s in runs:
        x = s.series.get("step_time")
        if x is not None and len(x) >= 4:
            t = x[:: g.thinning(len(x))]
            lag = max(lag, g.acf_cutoff(t, math.isqrt(len(t))))
    return lag


def _side_points(spec: MetricSpec, runs: Sequence[Side], ctx: _Context) -> list[float] | None:
    """Each run's statistic of the metric (``None`` when a run lacks it)."""
    points: list[float] = []
    for run in runs:
        if ctx.bootstrap:
            cols = _series_for(spec, run)
            if cols is None or _finite_count(cols) == 0:
                return None
            with np.errstate(all="ignore"):
                points.append(_point(_RUN_STATS[spec.statistic], cols))
        else:
            st = run.stats.get(spec.name) if run.kind == "summary" else _stats_of(spec, run)
            if st is None or not math.isfinite(st[0]):
                return None
            points.append(st[0])
    return points


def _floors(
    base: Sequence[Side], new: Sequence[Side], aa: Sequence[Side], explicit_pct: float | None, ctx: _Context
) -> _Floors:
    timing = [s for s in metric_specs() if s.timing]
    if explicit_pct is not None:
        return _Floors({s.name: explicit_pct / 100 for s in timing}, "--noise-floor", len(base) > 1 and len(new) > 1)
    if aa:
        values: dict[str, float] = {}
        for spec in timing:
            ref = _side_points(spec, base[:1], ctx)
            drift = 0.0
            for partner in aa:
                other = _side_points(spec, [partner], ctx)
                if ref and other:
                    drift = max(drift, _drift(spec, ref[0], other[0]))
            values[spec.name] = drift
        names = ", ".join(Path(s.path).name for s in aa)
        return _Floors(values, f"measured from the A/A pair {Path(base[0].path).name} / {names}", False)
    if len(base) > 1 and len(new) > 1:
        how = "paired runs" if ctx.paired else "several runs per side"
        return _Floors({}, f"none: run-to-run drift is in the interval ({how})", True)
    if len(base) > 1 or len(new) > 1:
        many, label = (base, "base") if len(base) > 1 else (new, "new")
        values = {}
        for spec in timing:
            pts = _side_points(spec, many, ctx)
            if pts:
                centre = float(np.mean(pts))
                values[spec.name] = max(_drift(spec, centre, p) for p in pts)
        return _Floors(values, f"measured from the spread of the {label} side's {len(many)} runs", False)
    pct = DEFAULT_NOISE_FLOOR_PCT
    return _Floors({s.name: pct / 100 for s in timing}, f"default {pct:g}% for one run per side", False)


def _drift(spec: MetricSpec, ref: float, other: float) -> float:
    """How far ``other`` is from ``ref``: relative (oriented either way), in points for a share."""
    if spec.additive:
        return abs(other - ref)
    if ref <= 0 or other <= 0 or not (math.isfinite(ref) and math.isfinite(other)):
        return 0.0
    return max(other / ref, ref / other) - 1


NOT_MEASURED = "not measured in both inputs; not gated"
PEAKS_ONLY = f"fewer than {MIN_SAMPLES} samples: peak values compared, no interval"
ZERO_IN_BASE = "absent in base"


def _result(spec: MetricSpec, **kw: Any) -> MetricResult:
    defaults: dict[str, Any] = dict(
        base=None, new=None, ratio=None, ci_low=None, ci_high=None, n_base=0, n_new=0, effect_size=None
    )
    defaults.update(kw)
    defaults.setdefault("verdict", INCONCLUSIVE)
    return MetricResult(spec, **defaults)


def _compare_metric(
    spec: MetricSpec, base: Sequence[Side], new: Sequence[Side], ctx: _Context, floor: float
) -> MetricResult:
    if ctx.bootstrap:
        return _bootstrap_metric(spec, base, new, ctx, floor)
    return _approximate_metric(spec, base, new, ctx, floor)


def _decide(
    spec: MetricSpec, bv: float, nv: float, ratio: float, lo: float, hi: float, ctx: _Context, floor: float, n: int
) -> tuple[str, int | None]:
    verdict = verdict_for(ratio, lo, hi, ctx.gate, spec.higher_is_better, floor)
    need = None
    if verdict == INCONCLUSIVE and ratio > 0 and lo > 0:
        need = g.steps_to_decide(n, *g.oriented(ratio, lo, hi, spec.higher_is_better), ctx.gate, floor)
    return verdict, need


def _bootstrap_metric(
    spec: MetricSpec, base: Sequence[Side], new: Sequence[Side], ctx: _Context, floor: float
) -> MetricResult:
    fn = _RUN_STATS[spec.statistic]
    cols_b = [_series_for(spec, r) for r in base]
    cols_n = [_series_for(spec, r) for r in new]
    counts_b = [0 if c is None else _finite_count(c) for c in cols_b]
    counts_n = [0 if c is None else _finite_count(c) for c in cols_n]
    nb, nn = sum(counts_b), sum(counts_n)
    if min(counts_b) == 0 or min(counts_n) == 0:
        return _result(spec, n_base=nb, n_new=nn, note=NOT_MEASURED)
    with np.errstate(all="ignore"):
        pb = [_point(fn, c) for c in cols_b if c is not None]
        pn = [_point(fn, c) for c in cols_n if c is not None]
    bv, nv = float(np.mean(pb)), float(np.mean(pn))
    few = min(counts_b) < MIN_SAMPLES or min(counts_n) < MIN_SAMPLES
    if few and spec.statistic == "p95":
        # memory is a level: with few samples, compare the peaks themselves (no interval)
        bmax = float(np.mean([np.nanmax(c[0]) for c in cols_b if c is not None]))
        nmax = float(np.mean([np.nanmax(c[0]) for c in cols_n if c is not None]))
        if bmax > 0:
            ratio = nmax / bmax
            verdict = verdict_for(ratio, ratio, ratio, ctx.gate, spec.higher_is_better)
            return _result(
                spec, base=bmax, new=nmax, ratio=ratio, ci_low=ratio, ci_high=ratio, n_base=nb, n_new=nn,
                verdict=verdict, note=PEAKS_ONLY,
            )  # fmt: skip
    if few:
        return _result(
            spec, base=bv, new=nv, ratio=nv / bv if bv > 0 and not spec.additive else None, n_base=nb, n_new=nn,
            note=f"too few samples (need {MIN_SAMPLES} in each run)",
        )  # fmt: skip
    if not spec.additive:
        if bv <= 0 and nv <= 0:  # a phase that never happened in either run
            return _result(
                spec, base=bv, new=nv, ratio=1.0, ci_low=1.0, ci_high=1.0, n_base=nb, n_new=nn, effect_size=0.0,
                verdict=EQUIVALENT, note="zero in both",
            )  # fmt: skip
        if bv <= 0:
            return _result(spec, base=bv, new=nv, n_base=nb, n_new=nn, note=ZERO_IN_BASE)
    draws_b = _side_draws(fn, cols_b, ctx, seed=ctx.seed)
    draws_n = _side_draws(fn, cols_n, ctx, seed=ctx.seed if ctx.paired else ctx.seed + 1)
    with np.errstate(all="ignore"):
        if spec.additive:
            d = nv - bv
            lo_d, hi_d = g.percentile_interval(draws_n - draws_b)
            ratio, lo, hi = 1 + d, 1 + lo_d, 1 + hi_d
        else:
            ratio = nv / bv
            lo, hi = g.percentile_interval(draws_n / draws_b)
    effect = None
    if spec.statistic in _QUANTILE:
        effect = cliffs_delta(_pooled(cols_b), _pooled(cols_n))
    steps_per_run = min(min(counts_b), min(counts_n))
    verdict, need = _decide(spec, bv, nv, ratio, lo, hi, ctx, floor, steps_per_run)
    return _result(
        spec, base=bv, new=nv, ratio=ratio, ci_low=lo, ci_high=hi, n_base=nb, n_new=nn, effect_size=effect,
        verdict=verdict, noise_floor=floor, steps_to_decide=need,
    )  # fmt: skip


def _pooled(cols: Sequence[list[np.ndarray] | None]) -> np.ndarray:
    v = np.concatenate([c[0] for c in cols if c is not None])
    return v[np.isfinite(v)]


def _side_draws(fn: g.RunStatistic, cols: Sequence[list[np.ndarray] | None], ctx: _Context, seed: int) -> np.ndarray:
    """A side's hierarchical bootstrap draws: per run, circular blocks of (thinned) steps; then runs."""
    per_run = []
    for c in cols:
        assert c is not None
        k = g.thinning(len(c[0]))
        t = [x[::k] for x in c]
        block = g.block_length(len(t[0]), ctx.lag)
        draws = g.run_bootstrap(t, fn, block, ctx.resamples, ctx.seed)
        per_run.append(draws * _recentre(fn, c, t))
    return g.combine_runs(per_run, ctx.resamples, seed)


def _approximate_metric(
    spec: MetricSpec, base: Sequence[Side], new: Sequence[Side], ctx: _Context, floor: float
) -> MetricResult:
    def stats(runs: Sequence[Side]) -> list[tuple[float, float, int]] | None:
        out = []
        for r in runs:
            st = r.stats.get(spec.name) if r.kind == "summary" else _stats_of(spec, r)
            if st is None or not math.isfinite(st[0]):
                return None
            out.append(st)
        return out

    sb, sn = stats(base), stats(new)
    if sb is None or sn is None:
        return _result(
            spec,
            n_base=sum(s[2] for s in sb or ()),
            n_new=sum(s[2] for s in sn or ()),
            note=NOT_MEASURED,
        )
    bv, nv = float(np.mean([s[0] for s in sb])), float(np.mean([s[0] for s in sn]))
    nb, nn = sum(s[2] for s in sb), sum(s[2] for s in sn)
    if spec.additive:  # a share per run, no spread: compared as a point, within the gate and floor
        ratio = 1 + nv - bv
        verdict = verdict_for(ratio, ratio, ratio, ctx.gate, spec.higher_is_better, floor)
        return _result(
            spec, base=bv, new=nv, ratio=ratio, ci_low=ratio, ci_high=ratio, n_base=nb, n_new=nn, verdict=verdict,
            note="point comparison (one share per run)", noise_floor=floor,
        )  # fmt: skip
    memory = spec.statistic == "p95"
    if not memory and (min(s[2] for s in sb) < MIN_SAMPLES or min(s[2] for s in sn) < MIN_SAMPLES):
        return _result(
            spec, base=bv, new=nv, ratio=nv / bv if bv > 0 else None, n_base=nb, n_new=nn,
            note=f"too few steps (need {MIN_SAMPLES} in each run)",
        )  # fmt: skip
    if bv <= 0 and nv <= 0:
        return _result(
            spec, base=bv, new=nv, ratio=1.0, ci_low=1.0, ci_high=1.0, n_base=nb, n_new=nn, verdict=EQUIVALENT,
            note="zero in both",
        )  # fmt: skip
    if bv <= 0:
        return _result(spec, base=bv, new=nv, n_base=nb, n_new=nn, note=ZERO_IN_BASE)
    if memory:  # one peak per run: the ratio itself, no interval to speak of
        ratio = nv / bv
        verdict = verdict_for(ratio, ratio, ratio, ctx.gate, spec.higher_is_better)
        return _result(
            spec, base=bv, new=nv, ratio=ratio, ci_low=ratio, ci_high=ratio, n_base=nb, n_new=nn, verdict=verdict,
            note="single peak value per run",
        )  # fmt: skip
    s = math.sqrt(_side_rel_se(sb) ** 2 + _side_rel_se(sn) ** 2)
    ratio = nv / bv
    lo, hi = ratio * math.exp(-_Z * s), ratio * math.exp(_Z * s)
    verdict, need = _decide(spec, bv, nv, ratio, lo, hi, ctx, floor, min(min(x[2] for x in sb), min(x[2] for x in sn)))
    return _result(
        spec, base=bv, new=nv, ratio=ratio, ci_low=lo, ci_high=hi, n_base=nb, n_new=nn, verdict=verdict,
        note="approximate interval (summary statistics)", noise_floor=floor, steps_to_decide=need,
    )  # fmt: skip


def _side_rel_se(stats: Sequence[tuple[float, float, int]]) -> float:
    """Relative standard error of a side's mean of run medians: within-run spread, plus between runs."""
    r = len(stats)
    within = sum(_rel_se(*s) ** 2 for s in stats) / r**2
    meds = np.array([s[0] for s in stats])
    between = float(np.var(meds, ddof=1) / meds.mean() ** 2 / r) if r > 1 and meds.mean() > 0 else 0.0
    return math.sqrt(within + between)


def _phase_zero_rules(results: list[MetricResult], gate: float) -> list[MetricResult]:
    """A phase absent in the base and present in the new run: no ratio ("new"); it counts as a
    regression (shown, not gated) when it adds more than the gate to the base's step time."""
    step = next((m for m in results if m.spec.name == "step_time"), None)
    out = []
    for m in results:
        phase_added = m.note == ZERO_IN_BASE and m.spec.name.startswith("phase.") and m.new is not None
        if phase_added and step is not None and step.base and step.base > 0:
            v = REGRESSION if (m.new or 0) > gate * step.base else EQUIVALENT
            note = f"{ZERO_IN_BASE}: adds {(m.new or 0) / step.base * 100:.1f}% of the base step"
            m = replace(m, verdict=v, note=note)
        out.append(m)
    return out


def _pct(x: float) -> str:
    return f"{x:+.0f}%" if abs(x) >= 10 else f"{x:+.1f}%"


def _top_phase(results: Sequence[MetricResult]) -> str:
    """The phase that moved most in ms, e.g. ``residual +10.6 ms (+722%)``."""
    moved = [
        m
        for m in results
        if m.spec.name.startswith("phase.")
        and m.base is not None
        and m.new is not None
        and math.isfinite(m.new - m.base)
    ]
    if not moved:
        return ""
    top = max(moved, key=lambda m: abs((m.new or 0) - (m.base or 0)))
    delta = (top.new or 0) - (top.base or 0)
    rel = "new" if top.new_in_new else (_pct(top.change_pct) if top.change_pct is not None else "")
    return f"{top.spec.label} {delta:+.1f} ms" + (f" ({rel})" if rel else "")


def _why(m: MetricResult, results: Sequence[MetricResult]) -> str:
    """``step time +97%: residual +10.6 ms (+722%)`` — a gated metric and what moved it."""
    if m.change_pct is None:
        return m.spec.label
    if m.spec.additive:
        b, n = (m.base or 0) * 100, (m.new or 0) * 100
        return f"{m.spec.label} {m.change_pct:+.1f} pp of wall time ({b:.1f}% → {n:.1f}%)"
    head = f"{m.spec.label} {_pct(m.change_pct)}"
    if m.spec.name == "step_time":
        top = _top_phase(results)
        return f"{head}: {top}" if top else head
    if m.spec.name == "throughput":
        step = next((x for x in results if x.spec.name == "step_time"), None)
        out = next((x for x in results if x.spec.name == "outside_share"), None)
        if step is not None and out is not None and None not in (step.base, step.new, out.base, out.new, m.base, m.new):
            # ms per step: cycle = 1000 / rate; outside = share x cycle; compare the two shifts
            cb, cn = 1000 / (m.base or 1), 1000 / (m.new or 1)
            ob, on = (out.base or 0) * cb, (out.new or 0) * cn
            if abs(on - ob) >= abs((cn - on) - (cb - ob)):
                return f"{head}: time outside steps {on - ob:+.1f} ms per step"
            if step.verdict == REGRESSION:
                return f"{head} (the step time)"
            top = _top_phase(results)
            return f"{head}: step time {_pct(step.change_pct or 0)}" + (f", {top}" if top else "")
    return head


def _overall(results: list[MetricResult], gate_pct: float, floors: _Floors) -> tuple[str, int, str]:
    gated = [m for m in results if m.spec.gated and m.note != NOT_MEASURED]
    floor_txt = "" if floors.drift_covered else _floor_phrase(results)
    if any(m.verdict == REGRESSION for m in gated):
        worst = [m for m in gated if m.verdict == REGRESSION]
        whys = "; ".join(_why(m, results) for m in worst)
        return REGRESSION, EXIT_REGRESSION, f"{whys} — beyond the {gate_pct:g}% gate{floor_txt}"
    if any(m.verdict == INCONCLUSIVE for m in gated) or not gated:
        unsure = [m for m in gated if m.verdict == INCONCLUSIVE]
        if not unsure:
            return INCONCLUSIVE, EXIT_INCONCLUSIVE, "no gated metric was measured in both inputs"
        parts = []
        for m in unsure:
            part = f"{m.spec.label} {_fmt_change(m)}"
            if m.steps_to_decide:
                part += f", ~{m.steps_to_decide} steps per run would decide it"
            elif m.ci_low is not None and m.ci_high is not None:
                part += ", more runs (not more steps) would decide it"
            parts.append(part)
        return (
            INCONCLUSIVE,
            EXIT_INCONCLUSIVE,
            f"cannot tell within the {gate_pct:g}% gate{floor_txt}: {'; '.join(parts)}",
        )
    if any(m.verdict == IMPROVEMENT for m in gated):
        return (
            IMPROVEMENT,
            EXIT_PASS,
            "improved: " + "; ".join(_why(m, results) for m in gated if m.verdict == IMPROVEMENT),
        )
    return EQUIVALENT, EXIT_PASS, f"every gated metric within ±{gate_pct:g}%"


def _floor_phrase(results: Sequence[MetricResult]) -> str:
    step = next((m for m in results if m.spec.name == "step_time"), None)
    if step is None or step.noise_floor <= 0:
        return ""
    return f" and the {step.noise_floor * 100:.1f}% noise floor"


def load_side(path: str | Path) -> Side:
    """A recording (``.tml``) or a ``summary.json``, by content."""
    p = Path(path)
    if not p.is_file():
        raise ReportError(f"{str(p)!r} not found; expected a .tml recording or a summary.json from `traceml report`")
    try:
        with p.open("rb") as fh:
            head = fh.read(64).lstrip()
    except OSError as exc:
        raise ReportError(f"cannot read {str(p)!r}: {exc}") from exc
    if head.startswith(b"{"):
        try:
            summary = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ReportError(
                f"{str(p)!r} is not valid JSON ({exc}); expected a summary.json from `traceml report`"
            ) from exc
        if not isinstance(summary, dict):
            raise ReportError(f"{str(p)!r}: expected a JSON object (summary.json), found {type(summary).__name__}")
        return side_from_summary(summary, str(p))
    from replay.report import load_view

    return side_from_view(load_view(p), str(p))


def compare_files(
    base: str | Path | Sequence[str | Path],
    new: str | Path | Sequence[str | Path],
    *,
    max_regression_pct: float = DEFAULT_MAX_REGRESSION_PCT,
    noise_floor_pct: float | None = None,
    aa: Sequence[str | Path] = (),
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    paired: bool = False,
) -> Comparison:
    """Load each file (one or several per side) and compare: see :func:`compare_sides`."""

    def many(x: str | Path | Sequence[str | Path]) -> list[Side]:
        paths = [x] if isinstance(x, str | Path) else list(x)
        return [load_side(p) for p in paths]

    return compare_sides(
        many(base),
        many(new),
        max_regression_pct=max_regression_pct,
        noise_floor_pct=noise_floor_pct,
        aa=many(aa) if aa else [],
        resamples=resamples,
        seed=seed,
        paired=paired,
    )


# --- output ---------------------------------------------------------------------------------------


def _fmt_value(m: MetricResult, v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    if m.spec.unit == "bytes":
        return fmt_bytes(v)
    if m.spec.additive:
        return f"{v * 100:.1f}% of wall"
    return f"{v:.3f} {m.spec.unit}" if abs(v) < 10 else f"{v:.1f} {m.spec.unit}"


def _fmt_change(m: MetricResult) -> str:
    if m.new_in_new:
        return "new"
    if m.change_pct is None:
        return "—"
    unit = " pp" if m.spec.additive else "%"
    s = f"{m.change_pct:+.1f}{unit}"
    if m.ci_low is not None and m.ci_high is not None and m.ci_low != m.ci_high:
        s += f" [{(m.ci_low - 1) * 100:+.1f}, {(m.ci_high - 1) * 100:+.1f}]"
    return s


UNDECIDABLE_BY_STEPS = "more steps alone will not settle it: add runs per side"


def _note(m: MetricResult) -> str:
    parts = [m.note] if m.note else []
    if m.verdict == INCONCLUSIVE and m.steps_to_decide:
        parts.append(f"~{m.steps_to_decide} steps per run would decide it")
    elif m.verdict == INCONCLUSIVE and m.ci_low is not None and m.ci_high is not None:
        parts.append(UNDECIDABLE_BY_STEPS)
    return "; ".join(parts)


def table_rows(c: Comparison) -> list[list[str]]:
    return [
        [
            m.spec.label + ("" if m.spec.gated else " (info)"),
            _fmt_value(m, m.base),
            _fmt_value(m, m.new),
            _fmt_change(m),
            m.verdict,
            _note(m),
        ]
        for m in c.metrics
    ]


HEADER = ["metric", "base", "new", "change [95% CI]", "verdict", "note"]


def _cost(side: Side) -> str:
    """``; traceml cost X µs per step (Y%)`` when the run measured traceml's own cost."""
    return f"; {side.cost}" if side.cost else ""


def _runs_line(runs: Sequence[Side]) -> str:
    """``3 runs: a.tml (recording, 195 steps), ...`` (the run count first: it decides what is covered)."""
    count = f"{len(runs)} run" + ("s" if len(runs) != 1 else "")
    return f"{count}: " + ", ".join(f"{esc.visible(s.path, 1000)} ({s.kind}, {s.steps} steps{_cost(s)})" for s in runs)


def drift_line(c: Comparison) -> str:
    """Plainly: whether run-to-run drift is in the interval, and the noise floor otherwise."""
    runs = f"{len(c.base_runs)} base run{'s' if len(c.base_runs) != 1 else ''}, {len(c.new_runs)} new"
    if c.drift_covered and c.noise_floor_pct <= 0:
        how = "resamples run pairs (--paired)" if c.paired else "resamples runs"
        return f"run-to-run drift: covered ({runs}: the interval {how}, then blocks of steps)"
    floor = f"{c.noise_floor_pct:.1f}% noise floor ({c.floor_source})"
    if c.drift_covered:
        return f"run-to-run drift: covered ({runs}); a timing regression must also clear the {floor}"
    if len(c.base_runs) == 1 and len(c.new_runs) == 1:
        return (
            f"run-to-run drift: NOT covered (one run per side: the interval only knows this run's step-to-step "
            f"noise); a timing regression must clear the {floor}; record 3 runs per side to cover drift"
        )
    return f"run-to-run drift: covered on one side only ({runs}); a timing regression must clear the {floor}"


def _header_lines(c: Comparison) -> list[str]:
    lines = [
        f"base: {_runs_line(c.base_runs)}",
        f"new:  {_runs_line(c.new_runs)}",
        f"method: {METHOD_NOTES[c.method]}",
    ]
    if c.aligned:
        every = "both runs" if len(c.base_runs) + len(c.new_runs) == 2 else "every run"
        blocks = f"; resampled in circular blocks of {c.block} steps" if c.block else ""
        lines.append(f"aligned steps {c.aligned[0]}..{c.aligned[1]} ({c.aligned[2]} in {every}){blocks}")
    elif c.block:
        lines.append(f"steps resampled in circular blocks of {c.block}")
    lines.append(esc.visible(drift_line(c), 2000))
    return lines


def render_text(c: Comparison) -> str:
    rows = [HEADER, *table_rows(c)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = [*_header_lines(c), ""]
    for r in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    lines += ["", f"verdict: {c.verdict} — {c.reason} (exit {c.exit_code})"]
    return "\n".join(lines) + "\n"


def render_markdown(c: Comparison) -> str:
    icon = {REGRESSION: "🔴", INCONCLUSIVE: "🟠", IMPROVEMENT: "🟢", EQUIVALENT: "🟢"}[c.verdict]

    def runs(side: Sequence[Side]) -> str:
        return ", ".join(f"{esc.markdown_code(s.path, 1000)} ({s.kind}, {s.steps} steps{_cost(s)})" for s in side)

    def count(side: Sequence[Side], label: str) -> str:
        return f"{len(side)} {label} run{'s' if len(side) != 1 else ''}"

    lines = [
        f"## traceml compare — {icon} {c.verdict}",
        "",
        f"> {c.reason}. Gate: {c.gate_pct:g}%.",
        "",
        f"Base {runs(c.base_runs)} · new {runs(c.new_runs)}.",
        "",
        f"{count(c.base_runs, 'base')}, {count(c.new_runs, 'new')}.",
        "",
        f"{esc.markdown(drift_line(c))}.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|---|---:|---:|---:|---|---|",
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in table_rows(c)]
    lines += ["", f"_{METHOD_NOTES[c.method]}._"]
    return "\n".join(lines) + "\n"


def _figures(c: Comparison) -> list[tuple[str, go.Figure]]:
    figs: list[tuple[str, go.Figure]] = []
    bars = [m for m in c.metrics if m.change_pct is not None]
    fig = go.Figure()
    colors = {REGRESSION: "#b91c1c", IMPROVEMENT: "#15803d", EQUIVALENT: "#6b7280", INCONCLUSIVE: "#b45309"}
    err_hi = [((m.ci_high or m.ratio or 1) - (m.ratio or 1)) * 100 for m in bars]
    err_lo = [((m.ratio or 1) - (m.ci_low or m.ratio or 1)) * 100 for m in bars]
    fig.add_trace(
        go.Bar(
            x=[m.spec.label for m in bars],
            y=[m.change_pct for m in bars],
            marker_color=[colors[m.verdict] for m in bars],
            error_y={"type": "data", "array": err_hi, "arrayminus": err_lo, "visible": True},
            text=[m.verdict for m in bars],
            name="change %",
        )
    )
    for y in (c.gate_pct, -c.gate_pct):
        fig.add_hline(y=y, line_dash="dash", line_color="#9ca3af")
    fig.update_layout(
        title={"text": f"Change NEW vs BASE (%), 95% interval; gate ±{c.gate_pct:g}%", "x": 0.01},
        template="plotly_white",
        height=380,
        yaxis_title="%",
        margin={"l": 60, "r": 20, "t": 50, "b": 80},
    )
    figs.append(("changes", fig))
    if c.method == "bootstrap":
        dist = go.Figure()
        for label, side in (("base", c.base_runs), ("new", c.new_runs)):
            v = np.concatenate([r.series.get("step_time", np.empty(0)) for r in side])
            v = v[np.isfinite(v)]
            if len(v) > 20_000:
                v = np.sort(v)[:: int(math.ceil(len(v) / 20_000))]
            dist.add_trace(go.Box(x=v, name=label, boxpoints=False))
        dist.update_layout(
            title={"text": "Step time distribution (ms), aligned steps", "x": 0.01},
            template="plotly_white",
            height=300,
            xaxis_title="ms",
            margin={"l": 60, "r": 20, "t": 50, "b": 45},
        )
        figs.append(("steps", dist))
    return figs


def render_html(c: Comparison) -> str:
    from replay.report import _CSS, _SEVERITY_COLOR, _e, _table

    color = {REGRESSION: _SEVERITY_COLOR["critical"], INCONCLUSIVE: _SEVERITY_COLOR["warn"]}.get(c.verdict, "#15803d")
    parts = [
        "<h1>traceml compare</h1>",
        f"<div class=sub>base {_e(_runs_line(c.base_runs))} · new {_e(_runs_line(c.new_runs))}</div>",
        f"<div class=sub>{_e(drift_line(c))}</div>",
        f"<div class=verdict style='border-color:{color}'><b style='color:{color}'>{_e(c.verdict)}</b> "
        f"(exit {c.exit_code})<br>{_e(c.reason)}; gate {c.gate_pct:g}%</div>",
        _table(HEADER, [[_e(x) for x in r] for r in table_rows(c)], numeric_from=1),
        f"<p class=sub>{_e(METHOD_NOTES[c.method])}"
        + (f"; aligned steps {c.aligned[0]}–{c.aligned[1]} ({c.aligned[2]})" if c.aligned else "")
        + "</p>",
    ]
    for name, fig in _figures(c):
        div = fig.to_html(
            full_html=False, include_plotlyjs=False, div_id=f"chart-{name}", config={"displaylogo": False}
        )
        parts.append(f"<div class=chart>{div}</div>")
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>traceml compare</title>"
        f"<style>{_CSS}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script>'
        f"</head><body><main>{''.join(parts)}</main></body></html>\n"
    )


def write_outputs(c: Comparison, out_dir: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Write compare.html/json/md into ``out_dir``; existing ones are refused unless ``overwrite``."""
    out = OutputDir(out_dir, overwrite=overwrite, option="--out")
    paths = [out.claim(COMPARE_HTML), out.claim(COMPARE_JSON), out.claim(COMPARE_MD)]
    try:
        out.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(
            f"cannot write the comparison into {str(out.root)!r}: {exc}; choose another --out directory"
        ) from exc
    out.check(paths)
    texts = (render_html(c), json.dumps(c.to_dict(), indent=2, allow_nan=False) + "\n", render_markdown(c))
    try:
        for path, text in zip(paths, texts, strict=True):
            with out.open(path, "w", encoding="utf-8") as f:
                f.write(text)
    except OSError as exc:
        raise ReportError(
            f"cannot write the comparison into {str(out.root)!r}: {exc}; choose another --out directory"
        ) from exc
    return paths


def metric(c: Comparison, name: str) -> MetricResult:
    return next(m for m in c.metrics if m.spec.name == name)


__all__: Sequence[str] = [
    "EQUIVALENT",
    "EXIT_ERROR",
    "EXIT_INCONCLUSIVE",
    "EXIT_PASS",
    "EXIT_REGRESSION",
    "IMPROVEMENT",
    "INCONCLUSIVE",
    "REGRESSION",
    "Comparison",
    "MetricResult",
    "Side",
    "bootstrap_ratio",
    "cliffs_delta",
    "compare_files",
    "compare_sides",
    "drift_line",
    "load_side",
    "side_from_summary",
    "side_from_view",
    "verdict_for",
    "write_outputs",
]
