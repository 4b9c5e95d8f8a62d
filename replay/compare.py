"""``traceml compare BASE NEW``: a verdict per metric with a confidence, and a CI gate.

Each side is a recording (``.tml``: full step distributions) or a ``summary.json`` (medians,
p95 and step counts only).  Steps are aligned on the step numbers both runs have, after the
warm-up and failed steps are removed (the diagnosis rules, docs/diagnosis.md).

Confidence: with two recordings, a seeded bootstrap of the ratio NEW/BASE of the medians (p95
for memory) gives a 95 % interval; Cliff's delta is the effect size.  With a summary on either
side, the interval comes from a normal approximation of the median's standard error (spread
estimated from median and p95): lower confidence, and the output says so.  Rules: docs/compare.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from traceml import escape as esc
from traceml.diagnosis import job_series, step_data
from traceml.diagnosis.memory import fmt_bytes
from traceml.errors import ReportError
from traceml.outpaths import OutputDir
from traceml.schema import PHASES
from traceml.store import StoreView

SCHEMA_VERSION = 1
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
DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
CONFIDENCE = 0.95
#: fewer samples than this on either side and a metric is INCONCLUSIVE
MIN_SAMPLES = 10
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
    statistic: str  # "median" | "p95"


def metric_specs() -> list[MetricSpec]:
    specs = [
        MetricSpec("step_time", "step time", "ms", False, True, "median"),
        MetricSpec("throughput", "throughput", "steps/s", True, True, "median"),
    ]
    specs += [MetricSpec(f"phase.{p}", f"{p}", "ms", False, False, "median") for p in PHASES]
    specs += [
        MetricSpec("peak_gpu_memory", "peak GPU memory", "bytes", False, True, "p95"),
        MetricSpec("peak_rss", "peak host RSS", "bytes", False, True, "p95"),
    ]
    return specs


@dataclass(frozen=True)
class Side:
    """One input: a recording's per-step series, or a summary's statistics."""

    path: str
    kind: str  # "recording" | "summary"
    run_id: str
    name: str
    steps: int
    #: metric -> samples (recordings)
    series: Mapping[str, np.ndarray] = field(default_factory=dict)
    #: metric -> (median, p95, n) (summaries)
    stats: Mapping[str, tuple[float, float, int]] = field(default_factory=dict)
    step_numbers: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))


@dataclass(frozen=True)
class MetricResult:
    spec: MetricSpec
    base: float | None
    new: float | None
    ratio: float | None
    ci_low: float | None
    ci_high: float | None
    n_base: int
    n_new: int
    effect_size: float | None
    verdict: str
    note: str = ""

    @property
    def change_pct(self) -> float | None:
        return None if self.ratio is None else (self.ratio - 1) * 100

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
            "ratio": r(self.ratio),
            "change_pct": r(self.change_pct, 3),
            "ci_low_pct": None if self.ci_low is None else r((self.ci_low - 1) * 100, 3),
            "ci_high_pct": None if self.ci_high is None else r((self.ci_high - 1) * 100, 3),
            "n_base": self.n_base,
            "n_new": self.n_new,
            "effect_size": r(self.effect_size, 4),
            "verdict": self.verdict,
            "note": self.note,
        }


@dataclass(frozen=True)
class Comparison:
    base: Side
    new: Side
    metrics: list[MetricResult]
    gate_pct: float
    method: str  # "bootstrap" | "approximate"
    seed: int
    resamples: int
    aligned: tuple[int, int, int] | None  # first, last, count of aligned steps
    verdict: str
    exit_code: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        def side(s: Side) -> dict[str, Any]:
            return {"path": s.path, "kind": s.kind, "run_id": s.run_id, "name": s.name, "steps": s.steps}

        return {
            "schema_version": SCHEMA_VERSION,
            "base": side(self.base),
            "new": side(self.new),
            "gate_pct": self.gate_pct,
            "confidence_level": CONFIDENCE,
            "method": self.method,
            "method_note": METHOD_NOTES[self.method],
            "seed": self.seed,
            "resamples": self.resamples if self.method == "bootstrap" else 0,
            "aligned_steps": None
            if self.aligned is None
            else {"first": self.aligned[0], "last": self.aligned[1], "count": self.aligned[2]},
            "metrics": [m.to_dict() for m in self.metrics],
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "reason": self.reason,
        }


METHOD_NOTES = {
    "bootstrap": (
        "95% interval of NEW/BASE from a seeded bootstrap over the aligned step distributions "
        "(median; p95 for memory); effect size = Cliff's delta"
    ),
    "approximate": (
        "lower confidence: at least one input is a summary.json, so there are no step distributions; the "
        "interval is a normal approximation from each side's median, p95 and step count"
    ),
}


# --- statistics (pure) ---------------------------------------------------------------------------


_QUANTILE = {"median": 0.5, "p95": 0.95}


def _stat(values: np.ndarray, statistic: str) -> float:
    return float(np.quantile(values, _QUANTILE[statistic]))


def bootstrap_quantile(values: np.ndarray, q: float, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``resamples`` draws of the bootstrap distribution of the ``q`` quantile of ``values``.

    Exact and O(n log n + resamples): a resample's k-th order statistic is the sorted sample at
    index floor(n * U_(k)), where U_(k) ~ Beta(k, n - k + 1) is the k-th of n uniforms, and the
    next one is U_(k) + (1 - U_(k)) * Beta(1, n - k).  The quantile interpolates the two linearly,
    as ``np.quantile`` does.
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
) -> tuple[float, float, float]:
    """(ratio, low, high): NEW/BASE of ``statistic`` and its 95 % percentile-bootstrap interval.

    Both sides are resampled independently (``resamples`` times, seeded).
    """
    rng = np.random.default_rng(seed)
    base, new = np.asarray(base, np.float64), np.asarray(new, np.float64)
    b0, n0 = _stat(base, statistic), _stat(new, statistic)
    if b0 <= 0:
        return float("nan"), float("nan"), float("nan")
    q = _QUANTILE[statistic]
    bb = bootstrap_quantile(base, q, resamples, rng)
    nb = bootstrap_quantile(new, q, resamples, rng)
    with np.errstate(all="ignore"):
        ratios = nb / bb
    ratios = ratios[np.isfinite(ratios)]
    alpha = (1 - CONFIDENCE) / 2
    lo, hi = np.quantile(ratios, [alpha, 1 - alpha]) if len(ratios) else (float("nan"), float("nan"))
    return n0 / b0, float(lo), float(hi)


def cliffs_delta(base: np.ndarray, new: np.ndarray) -> float:
    """P(new > base) - P(new < base) over all pairs, in O(n log n)."""
    b = np.sort(np.asarray(base, np.float64))
    x = np.asarray(new, np.float64)
    if not len(b) or not len(x):
        return float("nan")
    below = np.searchsorted(b, x, side="left").sum()  # pairs with base < new
    above = (len(b) - np.searchsorted(b, x, side="right")).sum()  # pairs with base > new
    return float(below - above) / (len(b) * len(x))


def approx_ratio(base: tuple[float, float, int], new: tuple[float, float, int]) -> tuple[float, float, float]:
    """(ratio, low, high) from (median, p95, n) of each side: normal approximation on the log scale."""

    def rel_se(median: float, p95: float, n: int) -> float:
        sigma = max(p95 - median, 0.0) / 1.6448536269514722
        se = 1.2533141373155 * sigma / math.sqrt(max(n, 1))
        return max(se / median, _MIN_REL_SE) if median > 0 else float("inf")

    (mb, pb, nb), (mn, pn, nn) = base, new
    if mb <= 0:
        return float("nan"), float("nan"), float("nan")
    ratio = mn / mb
    if ratio <= 0:
        return ratio, float("nan"), float("nan")
    s = math.sqrt(rel_se(mb, pb, nb) ** 2 + rel_se(mn, pn, nn) ** 2)
    return ratio, ratio * math.exp(-_Z * s), ratio * math.exp(_Z * s)


def verdict_for(ratio: float, lo: float, hi: float, gate: float, higher_is_better: bool) -> str:
    """Verdict from NEW/BASE and its interval with gate ``g`` (0.05 = 5 %).

    Oriented so that "worse" is above 1: REGRESSION when the estimate is worse than the gate and
    the interval excludes no change; IMPROVEMENT mirrored; EQUIVALENT when the whole interval lies
    within the gate; otherwise INCONCLUSIVE.
    """
    if not all(math.isfinite(v) for v in (ratio, lo, hi)) or ratio <= 0 or lo <= 0:
        return INCONCLUSIVE
    if higher_is_better:  # worse = smaller: look at the reciprocal
        ratio, lo, hi = 1 / ratio, 1 / hi, 1 / lo
    if ratio > 1 + gate and lo > 1:
        return REGRESSION
    if ratio < 1 - gate and hi < 1:
        return IMPROVEMENT
    if lo >= 1 - gate and hi <= 1 + gate:
        return EQUIVALENT
    return INCONCLUSIVE


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


def side_from_view(view: StoreView, path: str = "") -> Side:
    """A recording side: per-step job series (warm-up and failed steps removed)."""
    data = step_data(view)
    job = job_series(data)
    series: dict[str, np.ndarray] = {"step_time": job["step"] / 1000}
    with np.errstate(divide="ignore"):
        series["throughput"] = np.where(job["step"] > 0, 1e6 / job["step"], np.nan)
    for p in PHASES:
        series[f"phase.{p}"] = job[p] / 1000
    series.update(_memory_series(view, data))
    return Side(
        path=path,
        kind="recording",
        run_id=str(view.meta.get("run_id", "") or ""),
        name=str(view.meta.get("run_name", "") or ""),
        steps=len(data.steps),
        series=series,
        step_numbers=data.steps,
    )


def side_from_summary(summary: Mapping[str, Any], path: str = "") -> Side:
    """A summary.json side: per-metric (median, p95, n) from the summary's statistics."""
    version = summary.get("schema_version")
    if not isinstance(version, int) or "steps" not in summary:
        raise ReportError(
            f"{path or 'summary'}: expected a traceml summary.json (with schema_version and steps); "
            f"found keys {sorted(summary)[:8]}"
        )
    if version > SCHEMA_VERSION:
        raise ReportError(
            f"{path}: summary schema_version {version} is newer than this traceml understands "
            f"({SCHEMA_VERSION}); upgrade traceml"
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
        if med > 0 and p95 > 0:
            # steps/s: the median maps to 1/median; the slow tail (p95 of time) becomes the low tail
            stats["throughput"] = (1000 / med, 1000 / med + (1000 / med - 1000 / p95), n)
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
    )


def _stats_of(values: np.ndarray, statistic: str) -> tuple[float, float, int]:
    v = values[np.isfinite(values)]
    if not len(v):
        return (float("nan"), float("nan"), 0)
    if statistic == "p95":  # memory: a summary carries only the peak, so compare peaks
        p = float(np.max(v))
        return (p, p, len(v))
    return (float(np.median(v)), float(np.percentile(v, 95)), len(v))


def _aligned(base: Side, new: Side) -> tuple[Side, Side, tuple[int, int, int] | None]:
    """Restrict both recordings' step series to the step numbers both have (when enough overlap)."""
    common = np.intersect1d(base.step_numbers, new.step_numbers)
    if len(common) < MIN_SAMPLES:
        return base, new, None

    def cut(s: Side) -> Side:
        keep = np.isin(s.step_numbers, common)
        series = {
            k: (v[keep] if len(v) == len(s.step_numbers) and not k.startswith("peak_") else v)
            for k, v in s.series.items()
        }
        return Side(s.path, s.kind, s.run_id, s.name, len(common), series, s.stats, s.step_numbers[keep])

    return cut(base), cut(new), (int(common[0]), int(common[-1]), len(common))


def compare_sides(
    base: Side,
    new: Side,
    *,
    max_regression_pct: float = DEFAULT_MAX_REGRESSION_PCT,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> Comparison:
    if not (max_regression_pct > 0 and math.isfinite(max_regression_pct)):
        raise ReportError(f"--max-regression must be a positive percentage; found {max_regression_pct}")
    gate = max_regression_pct / 100
    bootstrap = base.kind == "recording" and new.kind == "recording"
    aligned: tuple[int, int, int] | None = None
    if bootstrap:
        base, new, aligned = _aligned(base, new)
    results: list[MetricResult] = []
    for i, spec in enumerate(metric_specs()):
        results.append(_compare_metric(spec, base, new, gate, bootstrap, resamples, seed + i))
    gated = [m for m in results if m.spec.gated and m.note != NOT_MEASURED]
    if any(m.verdict == REGRESSION for m in gated):
        verdict, code = REGRESSION, EXIT_REGRESSION
        worst = [m.spec.label for m in gated if m.verdict == REGRESSION]
        reason = f"{', '.join(worst)} regressed beyond the {max_regression_pct:g}% gate"
    elif any(m.verdict == INCONCLUSIVE for m in gated) or not gated:
        verdict, code = INCONCLUSIVE, EXIT_INCONCLUSIVE
        unsure = [m.spec.label for m in gated if m.verdict == INCONCLUSIVE]
        reason = (
            f"cannot tell within the {max_regression_pct:g}% gate for: {', '.join(unsure)} (more steps narrow the interval)"
            if unsure
            else "no gated metric was measured in both inputs"
        )
    elif any(m.verdict == IMPROVEMENT for m in gated):
        verdict, code = IMPROVEMENT, EXIT_PASS
        reason = "improved: " + ", ".join(m.spec.label for m in gated if m.verdict == IMPROVEMENT)
    else:
        verdict, code = EQUIVALENT, EXIT_PASS
        reason = f"every gated metric within ±{max_regression_pct:g}%"
    return Comparison(
        base=base,
        new=new,
        metrics=results,
        gate_pct=max_regression_pct,
        method="bootstrap" if bootstrap else "approximate",
        seed=seed,
        resamples=resamples,
        aligned=aligned,
        verdict=verdict,
        exit_code=code,
        reason=reason,
    )


NOT_MEASURED = "not measured in both inputs; not gated"
PEAKS_ONLY = f"fewer than {MIN_SAMPLES} samples: peak values compared, no interval"


def _compare_metric(
    spec: MetricSpec, base: Side, new: Side, gate: float, bootstrap: bool, resamples: int, seed: int
) -> MetricResult:
    if bootstrap:
        b = base.series.get(spec.name, np.empty(0))
        n = new.series.get(spec.name, np.empty(0))
        b, n = b[np.isfinite(b)], n[np.isfinite(n)]
        if not len(b) or not len(n):
            return MetricResult(spec, None, None, None, None, None, len(b), len(n), None, INCONCLUSIVE, NOT_MEASURED)
        bv, nv = _stat(b, spec.statistic), _stat(n, spec.statistic)
        few = len(b) < MIN_SAMPLES or len(n) < MIN_SAMPLES
        if few and spec.statistic == "p95" and b.max() > 0:
            # memory is a level: with few samples, compare the peaks themselves (no interval)
            ratio = float(n.max() / b.max())
            verdict = verdict_for(ratio, ratio, ratio, gate, spec.higher_is_better)
            return MetricResult(
                spec, float(b.max()), float(n.max()), ratio, ratio, ratio, len(b), len(n), None, verdict, PEAKS_ONLY
            )
        if few:
            return MetricResult(
                spec,
                bv,
                nv,
                nv / bv if bv > 0 else None,
                None,
                None,
                len(b),
                len(n),
                None,
                INCONCLUSIVE,
                f"too few samples (need {MIN_SAMPLES} on each side)",
            )
        if bv <= 0 and nv <= 0:  # a phase that never happened in either run
            return MetricResult(spec, bv, nv, 1.0, 1.0, 1.0, len(b), len(n), 0.0, EQUIVALENT, "zero in both")
        ratio, lo, hi = bootstrap_ratio(b, n, statistic=spec.statistic, resamples=resamples, seed=seed)
        effect = cliffs_delta(b, n)
        verdict = verdict_for(ratio, lo, hi, gate, spec.higher_is_better)
        return MetricResult(spec, bv, nv, ratio, lo, hi, len(b), len(n), effect, verdict)
    sb = base.stats.get(spec.name) or (
        _stats_of(base.series[spec.name], spec.statistic) if spec.name in base.series else None
    )
    sn = new.stats.get(spec.name) or (
        _stats_of(new.series[spec.name], spec.statistic) if spec.name in new.series else None
    )
    if sb is None or sn is None or not (math.isfinite(sb[0]) and math.isfinite(sn[0])):
        return MetricResult(
            spec, None, None, None, None, None, sb[2] if sb else 0, sn[2] if sn else 0, None, INCONCLUSIVE, NOT_MEASURED
        )
    memory = spec.statistic == "p95"
    if not memory and (sb[2] < MIN_SAMPLES or sn[2] < MIN_SAMPLES):
        return MetricResult(
            spec, sb[0], sn[0], sn[0] / sb[0] if sb[0] > 0 else None, None, None, sb[2], sn[2], None, INCONCLUSIVE,
            f"too few steps (need {MIN_SAMPLES} on each side)",
        )  # fmt: skip
    if sb[0] <= 0 and sn[0] <= 0:
        return MetricResult(spec, sb[0], sn[0], 1.0, 1.0, 1.0, sb[2], sn[2], None, EQUIVALENT, "zero in both")
    if memory:  # one peak per side: the ratio itself, no interval to speak of
        ratio = sn[0] / sb[0] if sb[0] > 0 else float("nan")
        lo = hi = ratio
        note = "single peak value per side"
    else:
        ratio, lo, hi = approx_ratio(sb, sn)
        note = "approximate interval (summary statistics)"
    return MetricResult(
        spec,
        sb[0],
        sn[0],
        ratio,
        lo,
        hi,
        sb[2],
        sn[2],
        None,
        verdict_for(ratio, lo, hi, gate, spec.higher_is_better),
        note,
    )


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
    base: str | Path,
    new: str | Path,
    *,
    max_regression_pct: float = DEFAULT_MAX_REGRESSION_PCT,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> Comparison:
    return compare_sides(
        load_side(base), load_side(new), max_regression_pct=max_regression_pct, resamples=resamples, seed=seed
    )


# --- output ---------------------------------------------------------------------------------------


def _fmt_value(m: MetricResult, v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    if m.spec.unit == "bytes":
        return fmt_bytes(v)
    return f"{v:.3f} {m.spec.unit}" if abs(v) < 10 else f"{v:.1f} {m.spec.unit}"


def _fmt_change(m: MetricResult) -> str:
    if m.change_pct is None:
        return "—"
    s = f"{m.change_pct:+.1f}%"
    if m.ci_low is not None and m.ci_high is not None and m.ci_low != m.ci_high:
        s += f" [{(m.ci_low - 1) * 100:+.1f}, {(m.ci_high - 1) * 100:+.1f}]"
    return s


def table_rows(c: Comparison) -> list[list[str]]:
    return [
        [
            m.spec.label + ("" if m.spec.gated else " (info)"),
            _fmt_value(m, m.base),
            _fmt_value(m, m.new),
            _fmt_change(m),
            m.verdict,
            m.note,
        ]
        for m in c.metrics
    ]


HEADER = ["metric", "base", "new", "change [95% CI]", "verdict", "note"]


def render_text(c: Comparison) -> str:
    rows = [HEADER, *table_rows(c)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = [
        f"base: {esc.visible(c.base.path, 1000)} ({c.base.kind}, {c.base.steps} steps)",
        f"new:  {esc.visible(c.new.path, 1000)} ({c.new.kind}, {c.new.steps} steps)",
        f"method: {METHOD_NOTES[c.method]}",
    ]
    if c.aligned:
        lines.append(f"aligned steps {c.aligned[0]}..{c.aligned[1]} ({c.aligned[2]} in both runs)")
    lines.append("")
    for r in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    lines += ["", f"verdict: {c.verdict} — {c.reason} (exit {c.exit_code})"]
    return "\n".join(lines) + "\n"


def render_markdown(c: Comparison) -> str:
    icon = {REGRESSION: "🔴", INCONCLUSIVE: "🟠", IMPROVEMENT: "🟢", EQUIVALENT: "🟢"}[c.verdict]
    lines = [
        f"## traceml compare — {icon} {c.verdict}",
        "",
        f"> {c.reason}. Gate: {c.gate_pct:g}%.",
        "",
        f"Base {esc.markdown_code(c.base.path, 1000)} ({c.base.kind}, {c.base.steps} steps)"
        f" · new {esc.markdown_code(c.new.path, 1000)} ({c.new.kind}, {c.new.steps} steps).",
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
        for label, side in (("base", c.base), ("new", c.new)):
            v = side.series.get("step_time", np.empty(0))
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
        f"<div class=sub>base {_e(c.base.path)} ({_e(c.base.kind)}, {c.base.steps} steps) · "
        f"new {_e(c.new.path)} ({_e(c.new.kind)}, {c.new.steps} steps)</div>",
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
    "load_side",
    "side_from_summary",
    "side_from_view",
    "verdict_for",
    "write_outputs",
]
