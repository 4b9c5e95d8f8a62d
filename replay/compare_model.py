"""The data of ``traceml compare``: what is compared (metric specs, one run's side) and what comes
out (one result per metric, the comparison, and its compare.json schema).  No computation here:
:mod:`replay.compare` compares, :mod:`replay.compare_input` reads sides, :mod:`replay.compare_render` draws.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from replay.stats import CONFIDENCE
from traceml.schema import PHASES

#: compare.json schema (2: several runs per side, noise floor, measured throughput, outside-step share)
SCHEMA_VERSION = 2

EXIT_PASS = 0
EXIT_ERROR = 1
EXIT_INCONCLUSIVE = 3
EXIT_REGRESSION = 4

#: fewer samples than this in a run and a metric is INCONCLUSIVE
MIN_SAMPLES = 10


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


def fmt_change(m: MetricResult) -> str:
    """``+12.3% [+8.1, +16.0]``, ``+1.2 pp``, ``new`` (zero in the base) or ``—``."""
    if m.new_in_new:
        return "new"
    if m.change_pct is None:
        return "—"
    unit = " pp" if m.spec.additive else "%"
    s = f"{m.change_pct:+.1f}{unit}"
    if m.ci_low is not None and m.ci_high is not None and m.ci_low != m.ci_high:
        s += f" [{(m.ci_low - 1) * 100:+.1f}, {(m.ci_high - 1) * 100:+.1f}]"
    return s
