"""The whole run's step statistics when only a sample of its rows is held (a bounded read).

Plain data built by :class:`traceml.views.bounded.StepDigest`: exact counts and sums, 1% quantile sketches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from traceml.schema import PHASES
from traceml.views.sketch import QuantileSketch


@dataclass
class RankTotals:
    """One rank's analysed steps (failed rows and warm-up removed), exactly counted, sketched."""

    rank: int
    steps: int = 0
    step_sum_us: float = 0.0
    step: QuantileSketch = field(default_factory=QuantileSketch)
    #: step time less backward (nan backward counts 0): the part of a step that tells ranks apart
    outside_backward: QuantileSketch = field(default_factory=QuantileSketch)
    phases: dict[str, QuantileSketch] = field(default_factory=lambda: {p: QuantileSketch() for p in PHASES})
    phase_sum_us: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    first_step: int = -1
    last_step: int = -1
    #: start of the first analysed step (its end less its duration) and end of the last, wall ns
    start_ns: int = 0
    end_ns: int = 0


@dataclass
class StepTotals:
    """The whole run's step statistics, built by :class:`StepDigest` from every row."""

    #: the held sample's step numbers are the multiples of this (1: every row is held)
    stride: int
    #: step numbers below this are warm-up
    warmup_below: int
    warmup_steps: int
    recorded_rows: int = 0
    failed_rows: int = 0
    #: distinct analysed step numbers, and those every rank has
    steps: int = 0
    common_steps: int = 0
    first_step: int = -1
    last_step: int = -1
    #: per analysed step: the slowest rank's step time (all steps; and the common steps only)
    job_step: QuantileSketch = field(default_factory=QuantileSketch)
    job_step_common: QuantileSketch = field(default_factory=QuantileSketch)
    #: per analysed step: each phase's mean over the ranks that measured it
    job_phases: dict[str, QuantileSketch] = field(default_factory=lambda: {p: QuantileSketch() for p in PHASES})
    per_rank: dict[int, RankTotals] = field(default_factory=dict)

    def ranks(self) -> list[int]:
        """The ranks with analysed steps, in rank order."""
        return [r for r, rt in sorted(self.per_rank.items()) if rt.steps]

    def job_quantiles(self, qs: list[float]) -> list[float]:
        """Quantiles (us) of the job step time over the steps every rank has (sketched, 1%)."""
        return [float(x) for x in self.job_step_common.quantiles(qs)]

    def rates(self, ranks: list[int] | None = None) -> tuple[float, float, float]:
        """``(elapsed_s, steps_per_s, outside_share)`` of ``ranks`` (all by default), exact: the
        rank with the lowest rate sets the elapsed time and throughput (start of its first analysed
        step to the end of its last); the share of each rank's wall time outside its steps, averaged."""
        elapsed = throughput = math.nan
        shares = []
        for r in self.ranks() if ranks is None else ranks:
            rt = self.per_rank[r]
            wall_us = (rt.end_ns - rt.start_ns) / 1e3
            if wall_us > 0:
                shares.append(min(1.0, max(0.0, 1.0 - rt.step_sum_us / wall_us)))
                rate = rt.steps / (wall_us / 1e6)
                if not math.isfinite(throughput) or rate < throughput:
                    throughput, elapsed = rate, wall_us / 1e6
        return elapsed, throughput, (sum(shares) / len(shares) if shares else math.nan)
