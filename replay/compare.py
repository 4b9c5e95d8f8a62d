"""``traceml compare``: a verdict per metric with a confidence, and a CI gate that tells change from noise.

Rules: docs/compare.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from replay import stats as st
from replay.compare_input import align_steps, load_side, run_stats, series_for, side_from_summary, side_from_view
from replay.compare_model import (
    EXIT_ERROR,
    EXIT_INCONCLUSIVE,
    EXIT_PASS,
    EXIT_REGRESSION,
    MIN_SAMPLES,
    Comparison,
    MetricResult,
    MetricSpec,
    Side,
    fmt_change,
    metric_specs,
)
from replay.stats import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    EQUIVALENT,
    IMPROVEMENT,
    INCONCLUSIVE,
    REGRESSION,
    bootstrap_ratio,
    cliffs_delta,
    verdict_for,
)
from traceml.errors import ReportError

DEFAULT_MAX_REGRESSION_PCT = 5.0
#: with one run per side and no measured floor, a timing change must clear this much drift
DEFAULT_NOISE_FLOOR_PCT = 10.0
#: runs per side (each is loaded whole; the bootstrap cost grows with it)
MAX_RUNS_PER_SIDE = 64


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
        raise ReportError(f"--noise-floor must be a percentage >= 0, e.st. 8; found {noise_floor_pct}")
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
        cut, aligned = align_steps(everything)
        nb, nn = len(base_runs), len(new_runs)
        base_runs, new_runs, aa_runs = tuple(cut[:nb]), tuple(cut[nb : nb + nn]), tuple(cut[nb + nn :])
        lag = _dependence_lag((*base_runs, *new_runs))
        n0 = len(base_runs[0].series.get("step_time", ()))
        block = st.block_length(len(range(0, n0, st.thinning(n0))), lag) if n0 else None
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
            t = x[:: st.thinning(len(x))]
            lag = max(lag, st.acf_cutoff(t, math.isqrt(len(t))))
    return lag


def _side_points(spec: MetricSpec, runs: Sequence[Side], ctx: _Context) -> list[float] | None:
    """Each run's statistic of the metric (``None`` when a run lacks it)."""
    points: list[float] = []
    for run in runs:
        if ctx.bootstrap:
            cols = series_for(spec, run)
            if cols is None or st.finite_count(cols) == 0:
                return None
            with np.errstate(all="ignore"):
                points.append(st.point_estimate(st.RUN_STATISTICS[spec.statistic], cols))
        else:
            run_stat = run.stats.get(spec.name) if run.kind == "summary" else run_stats(spec, run)
            if run_stat is None or not math.isfinite(run_stat[0]):
                return None
            points.append(run_stat[0])
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
    verdict = st.verdict_for(ratio, lo, hi, ctx.gate, spec.higher_is_better, floor)
    need = None
    if verdict == INCONCLUSIVE and ratio > 0 and lo > 0:
        need = st.steps_to_decide(n, *st.oriented(ratio, lo, hi, spec.higher_is_better), ctx.gate, floor)
    return verdict, need


def _bootstrap_metric(
    spec: MetricSpec, base: Sequence[Side], new: Sequence[Side], ctx: _Context, floor: float
) -> MetricResult:
    fn = st.RUN_STATISTICS[spec.statistic]
    cols_b = [series_for(spec, r) for r in base]
    cols_n = [series_for(spec, r) for r in new]
    counts_b = [0 if c is None else st.finite_count(c) for c in cols_b]
    counts_n = [0 if c is None else st.finite_count(c) for c in cols_n]
    nb, nn = sum(counts_b), sum(counts_n)
    if min(counts_b) == 0 or min(counts_n) == 0:
        return _result(spec, n_base=nb, n_new=nn, note=NOT_MEASURED)
    with np.errstate(all="ignore"):
        pb = [st.point_estimate(fn, c) for c in cols_b if c is not None]
        pn = [st.point_estimate(fn, c) for c in cols_n if c is not None]
    bv, nv = float(np.mean(pb)), float(np.mean(pn))
    few = min(counts_b) < MIN_SAMPLES or min(counts_n) < MIN_SAMPLES
    if few and spec.statistic == "p95":
        # memory is a level: with few samples, compare the peaks themselves (no interval)
        bmax = float(np.mean([np.nanmax(c[0]) for c in cols_b if c is not None]))
        nmax = float(np.mean([np.nanmax(c[0]) for c in cols_n if c is not None]))
        if bmax > 0:
            ratio = nmax / bmax
            verdict = st.verdict_for(ratio, ratio, ratio, ctx.gate, spec.higher_is_better)
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
            lo_d, hi_d = st.percentile_interval(draws_n - draws_b)
            ratio, lo, hi = 1 + d, 1 + lo_d, 1 + hi_d
        else:
            ratio = nv / bv
            lo, hi = st.percentile_interval(draws_n / draws_b)
    effect = None
    if spec.statistic in st.QUANTILES:
        effect = st.cliffs_delta(_pooled(cols_b), _pooled(cols_n))
    steps_per_run = min(min(counts_b), min(counts_n))
    verdict, need = _decide(spec, bv, nv, ratio, lo, hi, ctx, floor, steps_per_run)
    return _result(
        spec, base=bv, new=nv, ratio=ratio, ci_low=lo, ci_high=hi, n_base=nb, n_new=nn, effect_size=effect,
        verdict=verdict, noise_floor=floor, steps_to_decide=need,
    )  # fmt: skip


def _pooled(cols: Sequence[list[np.ndarray] | None]) -> np.ndarray:
    v = np.concatenate([c[0] for c in cols if c is not None])
    return v[np.isfinite(v)]


def _side_draws(fn: st.RunStatistic, cols: Sequence[list[np.ndarray] | None], ctx: _Context, seed: int) -> np.ndarray:
    """A side's hierarchical bootstrap draws: per run, circular blocks of (thinned) steps; then runs."""
    per_run = []
    for c in cols:
        assert c is not None
        k = st.thinning(len(c[0]))
        t = [x[::k] for x in c]
        block = st.block_length(len(t[0]), ctx.lag)
        draws = st.run_bootstrap(t, fn, block, ctx.resamples, ctx.seed)
        per_run.append(draws * st.recentre(fn, c, t))
    return st.combine_runs(per_run, ctx.resamples, seed)


def _approximate_metric(
    spec: MetricSpec, base: Sequence[Side], new: Sequence[Side], ctx: _Context, floor: float
) -> MetricResult:
    def stats(runs: Sequence[Side]) -> list[tuple[float, float, int]] | None:
        out = []
        for r in runs:
            run_stat = r.stats.get(spec.name) if r.kind == "summary" else run_stats(spec, r)
            if run_stat is None or not math.isfinite(run_stat[0]):
                return None
            out.append(run_stat)
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
        verdict = st.verdict_for(ratio, ratio, ratio, ctx.gate, spec.higher_is_better, floor)
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
        verdict = st.verdict_for(ratio, ratio, ratio, ctx.gate, spec.higher_is_better)
        return _result(
            spec, base=bv, new=nv, ratio=ratio, ci_low=ratio, ci_high=ratio, n_base=nb, n_new=nn, verdict=verdict,
            note="single peak value per run",
        )  # fmt: skip
    s = math.sqrt(st.side_rel_se(sb) ** 2 + st.side_rel_se(sn) ** 2)
    ratio = nv / bv
    lo, hi = ratio * math.exp(-st.Z_95 * s), ratio * math.exp(st.Z_95 * s)
    verdict, need = _decide(spec, bv, nv, ratio, lo, hi, ctx, floor, min(min(x[2] for x in sb), min(x[2] for x in sn)))
    return _result(
        spec, base=bv, new=nv, ratio=ratio, ci_low=lo, ci_high=hi, n_base=nb, n_new=nn, verdict=verdict,
        note="approximate interval (summary statistics)", noise_floor=floor, steps_to_decide=need,
    )  # fmt: skip


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
    """The phase that moved most in ms, e.st. ``residual +10.6 ms (+722%)``."""
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
            part = f"{m.spec.label} {fmt_change(m)}"
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


def metric(c: Comparison, name: str) -> MetricResult:
    return next(m for m in c.metrics if m.spec.name == name)


__all__: Sequence[str] = [
    "DEFAULT_MAX_REGRESSION_PCT",
    "DEFAULT_NOISE_FLOOR_PCT",
    "EQUIVALENT",
    "EXIT_ERROR",
    "EXIT_INCONCLUSIVE",
    "EXIT_PASS",
    "EXIT_REGRESSION",
    "IMPROVEMENT",
    "INCONCLUSIVE",
    "MAX_RUNS_PER_SIDE",
    "NOT_MEASURED",
    "PEAKS_ONLY",
    "REGRESSION",
    "ZERO_IN_BASE",
    "Comparison",
    "MetricResult",
    "Side",
    "bootstrap_ratio",
    "cliffs_delta",
    "compare_files",
    "compare_sides",
    "load_side",
    "metric",
    "side_from_summary",
    "side_from_view",
    "verdict_for",
]
